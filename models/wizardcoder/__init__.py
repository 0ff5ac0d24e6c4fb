"""WizardCoder-15B (StarCoder / GPTBigCode, multi-query attention)."""
