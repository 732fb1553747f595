"""ICPO inference: ME-ICPO and its baselines on vLLM or transformers, with answer grading and reports."""
