"""The CPU end-to-end experiment: a synthetic task, a tiny Llama pretrained from scratch, the pipeline that
trains ICPO/SFT/MSE adapters on it and evaluates them, the demo, and the research probes that read its runs.
None of this is needed to train or evaluate a real model."""
