"""DeepSeek-V3 / R1 (MLA + MoE + MTP) in MindFormers 2.x mcore training names."""
