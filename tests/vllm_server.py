"""A real vLLM OpenAI-compatible server (its CPU build here), started and stopped by its process id.

The server listens on 127.0.0.1 only, runs in its own process group (so that stopping it ends the
engine's processes too) and serves LoRA adapters, loadable at run time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 300  # engine start takes 20-60 s on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMServer:
    def __init__(self, model: Path, log: Path, api_key: str | None = None, lora: bool = True) -> None:
        self.model, self.log, self.api_key, self.lora = model, log, api_key, lora
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def launch(self) -> VLLMServer:
        """Start the server's process without waiting: servers launched together boot side by side."""
        command = [
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model)),
            *("--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager"),
            *("--kv-cache-memory-bytes", str(2**30), "--max-model-len", "2048"),
            # The CPU build cannot rewind the generator of a seeded request whose prefill was split over
            # engine steps ("CPU Generator does not use offset", fatal): whole prefills only.
            *("--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"),
            *(("--enable-lora", "--max-lora-rank", "64") if self.lora else ()),
            *(("--api-key", self.api_key) if self.api_key else ()),
        ]
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "OMP_NUM_THREADS": "1"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return self

    def wait(self) -> VLLMServer:
        """Wait until the launched server answers; stop it and raise if it exits or does not answer."""
        assert self.process is not None, "launch() the server first"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/models", headers=self.headers, timeout=5).is_success:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the vLLM server did not answer within {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server's process group (SIGKILL: as a crash would) and wait for its leader."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)

    def served(self) -> list[str]:
        response = httpx.get(f"{self.url}/models", headers=self.headers, timeout=30)
        return [model["id"] for model in response.json()["data"]]

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]
