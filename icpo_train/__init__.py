"""ICPO training: the Fisher-weighted logit-matching loss, the toy LSA theory and the LLM trainer."""
