"""The Baichuan family (baichuan: Baichuan-7B/13B v1; baichuan2: Baichuan2-7B/13B)."""
