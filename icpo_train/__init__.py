"""ICPO training: the Fisher-weighted logit-matching loss, the toy LSA theory and the LLM trainer."""

import logging

# accelerate imports DeepSpeed whenever it is installed, and DeepSpeed then logs "Setting accelerator to
# CPU. If you have GPU or other accelerator, we were unable to detect it." at every run on a CPU machine,
# where CPU is right: nothing to act on. Only that message is dropped.
logging.getLogger("DeepSpeed").addFilter(
    lambda record: not record.getMessage().startswith("Setting accelerator to CPU.")
)
