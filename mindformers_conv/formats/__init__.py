"""On-disk formats: each module reads and/or writes one, and knows no model names."""
