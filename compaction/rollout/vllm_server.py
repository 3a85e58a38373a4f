"""Rollouts from a vLLM server: started from vLLM's own environment, or one already running.

vLLM cannot be installed beside the project (it caps fastapi below Prefect's floor), so it lives
in a venv of its own (``make vllm`` -> ``.venv-vllm``) and the project talks to its
OpenAI-compatible server over loopback HTTP:

- :class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` from that venv in a
  process group of its own (127.0.0.1, a free port, seed, dtype, ``max_model_len``, tensor
  parallelism, GPU memory share), waits for ``/health`` and stops the whole group on close, on
  error and on SIGTERM; with ``url`` it uses a server that is already running and stops nothing.
- ``POST /v1/completions`` with prompt token ids and ``return_token_ids`` samples; the ids that
  come back are the ones training uses.
- ``POST /collective_rpc`` ``reload_weights_from`` (dev mode, ``VLLM_SERVER_DEV_MODE=1``; the
  workers' extension in ``vllm_ext/``: vLLM's ``reload_weights`` plus a tied LM head's refresh)
  swaps in the safetensors of a folder, then ``/reset_prefix_cache`` drops KV blocks computed
  with the old weights.

:class:`VLLMServerEngine` is the :class:`~compaction.rollout.base.RolloutEngine` over a server:
the project's tokenizer encodes the prompts and decodes the ids, so its completions are built
exactly as the HF engine's are.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from compaction.rollout.base import Completion, Sampling

#: The vLLM environment's interpreter: this variable, else ``.venv-vllm/bin/python`` of the checkout.
VLLM_PYTHON_ENV = "COMPACTION_VLLM_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Holds ``compaction_vllm_ext`` (the workers' weight-reload method), put on the server's PYTHONPATH.
WORKER_EXTENSION_DIR = Path(__file__).resolve().parent / "vllm_ext"
#: The model name the server answers to (``--served-model-name``): reloads keep it.
SERVED_NAME = "policy"
#: Prompts per ``/v1/completions`` request (the server batches them itself).
REQUEST_PROMPTS = 256


#: Head sizes vLLM's CPU attention backend runs (vllm/v1/attention/backends/cpu_attn.py, 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VLLMServerError(RuntimeError):
    """The vLLM server did not start, died, or refused a request; the message names it and its log."""


def vllm_python() -> Path:
    """The vLLM environment's python; a clear error when it is missing (``make vllm`` makes it)."""
    path = Path(os.environ.get(VLLM_PYTHON_ENV) or REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not path.is_file():
        raise VLLMServerError(
            f"rollout.backend=vllm: no vLLM environment at {path}. Run `make vllm` (creates .venv-vllm), "
            f"set {VLLM_PYTHON_ENV} to the python of one, or point rollout.vllm_url at a running server")
    return path


def check_cpu_head_size(model_dir: str | Path) -> None:
    """vLLM on CPU fails at its first request on other head sizes: say so before starting it."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    head = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1)
    if head and head not in CPU_HEAD_SIZES:
        raise VLLMServerError(f"{cfg_path}: head_dim={head}, but vLLM's CPU attention runs head sizes "
                              f"{list(CPU_HEAD_SIZES)} only (model.tiny.head_dim for the embedded model)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec: the server gets SIGTERM if the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VLLMServer:
    """One vLLM OpenAI-compatible server. ``with VLLMServer(model, ...) as server:`` starts it
    (unless ``url`` names a running one) and stops its process group at the end."""

    def __init__(self, model: str, *, url: str | None = None, seed: int = 0, dtype: str = "float32",
                 max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, cpu_kv_cache_gib: int = 1, startup_timeout_s: float = 600,
                 request_timeout_s: float = 600, log_path: str | Path | None = None,
                 env: Mapping[str, str] | None = None):
        self.model, self.seed, self.dtype = str(model), seed, dtype
        self.max_model_len, self.tp, self.gpu_mem = max_model_len, tensor_parallel_size, gpu_memory_utilization
        self.cpu_kv_cache_gib, self.startup_timeout_s = cpu_kv_cache_gib, startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.external = url is not None
        self.url = url.rstrip("/") if url else None
        self.log_path = Path(log_path) if log_path else None
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._previous_sigterm = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> "VLLMServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """PID of the server's leader process (= its process group id); None for an external server."""
        return self.proc.pid if self.proc else None

    def describe(self) -> str:
        if self.external:
            return f"vLLM server at {self.url}"
        return f"vLLM server at {self.url} (pid {self.pid}, log {self.log_path})"

    def command(self, port: int) -> list[str]:
        cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", self.dtype, "--seed", str(self.seed), "--tensor-parallel-size", str(self.tp),
               "--gpu-memory-utilization", str(self.gpu_mem), "--disable-log-stats",
               "--worker-extension-cls", "compaction_vllm_ext.WorkerExtension"]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if not _cuda():
            # No CUDA graphs / torch.compile to build on CPU. No chunked prefill: on CPU, a seeded
            # request whose prefill is split crashes the engine (vLLM 0.32 rewinds its generator
            # with set_offset, which CPU generators lack: "CPU Generator does not use offset").
            cmd += ["--enforce-eager", "--no-enable-chunked-prefill"]
        return cmd

    def start(self) -> "VLLMServer":
        if self.external:
            self.wait_healthy(deadline_s=30)
            return self
        if not _cuda():
            check_cpu_head_size(self.model)
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="vllm-server-")) / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               **self.extra_env}
        env["PYTHONPATH"] = str(WORKER_EXTENSION_DIR)  # that module alone: the project's packages stay out
        if not _cuda():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_gib))  # GiB; vLLM's default takes most RAM
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process fewer to start on CPU
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(port), env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self._install_sigterm()
        from compaction.logs import get_logger

        get_logger().info("vLLM server starting: pid %d, %s, log %s", self.proc.pid, self.url, self.log_path)
        try:
            self.wait_healthy(self.startup_timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, deadline_s: float) -> None:
        import httpx

        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise VLLMServerError(f"{self.describe()} exited with code {self.proc.returncode} while starting; "
                                      f"its log ends:\n{self.log_tail()}")
            if time.monotonic() - t0 > deadline_s:
                raise VLLMServerError(f"{self.describe()} was not healthy within {deadline_s:.0f} s; "
                                      f"its log ends:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        data = self.log_path.read_bytes()[-chars:]
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after 15 s."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop_group(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._restore_sigterm()

    def _install_sigterm(self) -> None:
        """SIGTERM to this process raises SystemExit, so that ``close`` runs (main thread only)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous not in (signal.SIG_DFL, None):
            return  # the program handles SIGTERM itself (and exits through its finally blocks)

        def on_sigterm(signum, frame):
            self.close()
            raise SystemExit(128 + signum)

        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        import threading

        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    # ------------------------------------------------------------ requests
    def post(self, path: str, payload: dict, timeout: float | None = None) -> dict:
        import httpx

        try:
            r = httpx.post(f"{self.url}{path}", json=payload, timeout=timeout or self.request_timeout_s)
        except httpx.HTTPError as exc:
            state = ""
            if self.proc is not None and self.proc.poll() is not None:
                state = f" (it exited with code {self.proc.returncode})"
            raise VLLMServerError(f"{self.describe()}{state}: POST {path} failed: {exc!r}; "
                                  f"its log ends:\n{self.log_tail()}") from exc
        if r.status_code != 200:
            raise VLLMServerError(f"{self.describe()}: POST {path} answered {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else {}

    def completions(self, prompts: Sequence[Sequence[int]], sampling: Sampling,
                    stop_token_ids: Sequence[int] = ()) -> list[list[tuple[list[int], str]]]:
        """Per prompt (token ids), ``sampling.n`` samples as (token ids, finish reason)."""
        out: list[list[tuple[list[int], str]]] = []
        for s in range(0, len(prompts), REQUEST_PROMPTS):
            chunk = [list(map(int, p)) for p in prompts[s: s + REQUEST_PROMPTS]]
            payload = {
                "model": SERVED_NAME, "prompt": chunk, "n": sampling.n, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                # One seed a request; a chunk's own seed keeps later chunks independent of earlier ones.
                "seed": int(sampling.seed * 1_000_003 + s // REQUEST_PROMPTS) % (2 ** 63),
                "stop_token_ids": sorted(int(t) for t in stop_token_ids), "return_token_ids": True,
                "skip_special_tokens": True,
            }
            choices = self.post("/v1/completions", payload)["choices"]
            if len(choices) != len(chunk) * sampling.n:
                raise VLLMServerError(f"{self.describe()}: {len(choices)} completions for "
                                      f"{len(chunk)} prompts x n={sampling.n}")
            per_prompt: list[list[tuple[list[int], str]]] = [[] for _ in chunk]
            for c in sorted(choices, key=lambda c: c["index"]):
                per_prompt[c["index"] // sampling.n].append((list(c["token_ids"]), c["finish_reason"]))
            out += per_prompt
        return out

    def reload_weights(self, folder: str | Path) -> float:
        """Load the safetensors in ``folder`` (HF names) into the running engine; returns seconds."""
        t0 = time.perf_counter()
        self.post("/collective_rpc", {"method": "reload_weights_from", "kwargs": {"weights_path": str(folder)}})
        self.post("/reset_prefix_cache", {})
        return time.perf_counter() - t0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _stop_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while group_alive(proc.pid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.1)
    if group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def eos_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation config, else the tokenizer's eos."""
    cfg = Path(model_dir) / "generation_config.json"
    eos = json.loads(cfg.read_text()).get("eos_token_id") if cfg.is_file() else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted(set(eos if isinstance(eos, (list, tuple)) else [eos]))


class VLLMServerEngine:
    """The rollout engine over a :class:`VLLMServer` (see the module docstring)."""

    def __init__(self, server: VLLMServer, tokenizer, stop_token_ids: Sequence[int], owns_server: bool = True):
        self.server, self.tokenizer = server, tokenizer
        self.stop_token_ids = sorted(set(int(t) for t in stop_token_ids))
        self.owns_server = owns_server

    def generate(self, prompts: Sequence[str], sampling: Sampling, progress: bool = False) -> list[list[Completion]]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = self.server.completions(ids, sampling, self.stop_token_ids)
        return [[self._completion(t, reason) for t, reason in samples] for samples in out]

    def _completion(self, ids: list[int], finish_reason: str) -> Completion:
        # As the HF engine: the ids keep the end token, the text does not; decoded by our tokenizer.
        ended = bool(ids) and ids[-1] in self.stop_token_ids
        text = self.tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        return Completion(text, ids, "stop" if ended else "length" if finish_reason == "length" else "stop")

    def reload(self, folder: str | Path) -> float:
        return self.server.reload_weights(folder)

    def close(self) -> None:
        if self.owns_server:
            self.server.close()


def write_weights(weights: Mapping[str, "object"], folder: Path, dtype=None, tied_embeddings: bool = False) -> Path:
    """``folder/model.safetensors``: ``weights`` (HF names) for :meth:`VLLMServer.reload_weights`,
    written to a temp file and renamed. With tied embeddings ``lm_head.weight`` is left out (vLLM's
    loader skips it; the workers' extension re-derives the head from the embedding)."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen: set[int] = set()
    for name, t in weights.items():
        if tied_embeddings and name == "lm_head.weight":
            continue
        t = t.detach()
        t = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
        if t.data_ptr() in seen:
            t = t.clone()  # tied weights (lm_head = embeddings): safetensors refuses shared storage
        seen.add(t.data_ptr())
        tensors[name] = t
    tmp = folder / ".model.safetensors.tmp"
    safetensors.torch.save_file(tensors, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    return folder / "model.safetensors"


if __name__ == "__main__":  # pragma: no cover - a manual check: python -m compaction.rollout.vllm_server MODEL
    with VLLMServer(sys.argv[1]) as srv:
        print(srv.describe(), "healthy")
