"""TeleChat (TeleChat-7B/12B; 7b and 12b key styles)."""
