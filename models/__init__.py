"""Model families: each `models/<family>/declaration.py` registers its rules with the engine."""
