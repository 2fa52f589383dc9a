"""One whole GRPO step, ours against TRL's GRPOTrainer, in one run.

Both trainers start from the same saved model (random init, a real vocabulary size), the same prompts, G, completion
length, sampling (temperature 1, no top-k / top-p), loss (dapo, beta 0.04 against a frozen reference copy, one
update per batch) and the same reward function (``token_reward``: it reads the completion's token ids, so it varies
across samples of a random model, and neither trainer can skip a zero-advantage backward). Both generate with
transformers. The steps interleave (TRL step k, then our step k, ...); the first step of each is a warm-up. Per step
we report the phase split (generation, scoring, reference log-probs, training forward + backward, optimizer, weight
sync), generated tokens per second, and the peak extra tensor memory of a whole step (the exact peak of live tensor
bytes on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA), each as ours / TRL's.

    python bench/bench_e2e.py --preset cpu       # tiny Qwen2 student, 151,936-token vocabulary, fp32 (CPU)
    python bench/bench_e2e.py --preset gpu       # Qwen2.5-0.5B shape, bf16 (CUDA; bench/device_check.sh)
    python bench/bench_e2e.py --preset smoke     # seconds: what CI runs

Writes results.json, results.csv and results.png into --out (default bench/results/e2e-<preset>).

``--server-sync N`` (vLLM installed) also times server mode's weight push: the same model pushed N times (after a
warm-up push, which for gloo joins the process group) to a loopback ``vllm serve`` by each path, ``file``
(safetensors under /dev/shm + the workers' reload) and ``gloo`` (a process group with the server's workers,
bucketed broadcasts), into server_sync.json. ``--async-overlap N`` times N steps of ours in server mode with
``async_steps`` 0, 1 and 2 (the next steps' rollouts generated while this one trains) into the same file.
``--skip-race`` runs only those.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_grpo_loss import environment  # noqa: E402
from exgrpo.config import ModelConfig, OptimConfig, SamplingConfig, TrainConfig  # noqa: E402
from exgrpo.grpo import train_steps  # noqa: E402
from exgrpo.metrics import LiveTensorBytes  # noqa: E402
from exgrpo.model import build_student  # noqa: E402
from exgrpo.tasks.arithmetic import make_split  # noqa: E402

PRESETS = {
    "smoke": dict(model=dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_layers=2, head_dim=32,
                             vocab_size=4096), prompts=2, G=4, completion=8, steps=3, precision="fp32"),
    "cpu": dict(model=dict(arch="qwen2", hidden_size=256, intermediate_size=768, num_layers=2, head_dim=64,
                           vocab_size=151936), prompts=2, G=8, completion=256, steps=4, precision="fp32"),
    "gpu": dict(model=dict(preset="qwen2.5-0.5b"), prompts=8, G=8, completion=512, steps=5, precision="bf16"),
}
PHASES = ("gen", "score", "ref", "train", "optim", "sync")


def token_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """The share of completion tokens whose id is a multiple of 7: cheap, and different for every sample."""
    return [sum(t % 7 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


class Timed:
    """Accumulates wall time of wrapped calls by phase (CUDA: synchronised)."""

    def __init__(self, cuda: bool):
        self.cuda, self.t = cuda, {}

    def add(self, name, dt):
        self.t[name] = self.t.get(name, 0.0) + dt

    def wrap(self, obj, attr, name_of):
        fn = getattr(obj, attr)

        def run(*a, **k):
            name = name_of()
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.add(name, time.perf_counter() - t0)
        setattr(obj, attr, run)


@contextlib.contextmanager
def peak_extra(device: torch.device, out: dict):
    """out["peak_gib"]: the peak extra tensor memory of the block."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        out["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    else:
        mode = LiveTensorBytes()
        with mode:
            yield
        out["peak_gib"] = mode.peak / 2 ** 30


def _ours_config(p: dict, root: str, model_dir: str, data: str, steps: int) -> TrainConfig:
    return TrainConfig(
        data=data, init=model_dir, model=ModelConfig(path=model_dir), out_dir=os.path.join(root, "ours"), steps=steps,
        questions_per_step=p["prompts"], G=p["G"], mode="direct", dsu=False, aux_weight=0.0,
        rewards=("bench.bench_e2e:token_reward",), optim=OptimConfig(lr=1e-6, warmup_steps=0, min_lr_ratio=1.0),
        loss=TrainConfig().loss.replace(loss_type="dapo", beta=0.04, temperature=1.0, compute_entropy=False),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=p["completion"]), backend="transformers",
        precision=p["precision"], log_samples=0, progress=False, micro_batch_tokens=1 << 20)


def _trl_trainer(p: dict, root: str, model_dir: str, prompts: list[str], steps: int, on_step_end):
    import datasets
    import trl
    from transformers import TrainerCallback

    class Hook(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            on_step_end(state.global_step)

    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in prompts])
    cuda = torch.cuda.is_available()
    args = trl.GRPOConfig(output_dir=os.path.join(root, "trl"), per_device_train_batch_size=p["prompts"] * p["G"],
                          num_generations=p["G"], max_completion_length=p["completion"], max_steps=steps,
                          learning_rate=1e-6, lr_scheduler_type="constant", loss_type="dapo", beta=0.04,
                          temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, logging_steps=1, seed=0,
                          report_to=[], save_strategy="no", use_cpu=not cuda, bf16=p["precision"] == "bf16",
                          dataloader_num_workers=0, gradient_accumulation_steps=1, disable_dropout=True,
                          log_completions=False, max_grad_norm=1.0)
    return trl.GRPOTrainer(model=model_dir, reward_funcs=[token_reward], args=args, train_dataset=ds,
                           callbacks=[Hook()])


class Racer:
    """Runs TRL's train() and steps our trainer from its step-end callback: TRL step k, then ours."""

    def __init__(self, p, root, model_dir, data, prompts, device):
        self.p, self.device = p, device
        self.total = p["steps"] + 2  # a warm-up, the timed steps, one step under the memory probe
        self.cuda = device.type == "cuda"
        self.rows = {"trl": [], "ours": []}
        self.ours = train_steps(_ours_config(p, root, model_dir, data, self.total))
        self.trl = _trl_trainer(p, root, model_dir, prompts, self.total, self._after_trl_step)
        self.timed = Timed(self.cuda)
        tr = self.trl
        self.timed.wrap(tr, "_generate", lambda: "gen")
        self.timed.wrap(tr, "_calculate_rewards", lambda: "score")
        self.timed.wrap(tr, "_get_per_token_logps_and_entropies",
                        lambda: "train_logps" if torch.is_grad_enabled() else "ref")
        self.timed.wrap(tr, "_prepare_inputs", lambda: "prepare")
        self.timed.wrap(tr, "training_step", lambda: "training_step")
        self.timed.wrap(tr, "compute_loss", lambda: "loss")
        self.mem = {}
        self._t0 = None
        self._ctx = None

    # ---- TRL's side: its step spans on_step_begin .. on_step_end; a callback starts the clock
    def start_trl_step(self):
        self.timed.t = {}
        if self.memory_step():
            self._ctx = peak_extra(self.device, self.mem.setdefault("trl", {}))
            self._ctx.__enter__()
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def memory_step(self) -> bool:
        return len(self.rows["trl"]) == self.total - 1  # the last step runs under the memory probe

    def _after_trl_step(self, global_step):
        if self.cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - self._t0
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        t = dict(self.timed.t)
        train = t.get("training_step", 0.0) - t.get("prepare", 0.0)
        row = {"step_s": total, "gen": t.get("gen", 0.0), "score": t.get("score", 0.0), "ref": t.get("ref", 0.0),
               "train": train, "optim": max(0.0, total - t.get("training_step", 0.0)), "sync": 0.0}
        log = [x for x in self.trl.state.log_history if "completions/mean_length" in x]
        row["tokens"] = (log[-1]["completions/mean_length"] if log else self.p["completion"]) * self.p["prompts"] * self.p["G"]
        self.rows["trl"].append(row)
        self._our_step()

    def _our_step(self):
        mem = self.memory_step_ours()
        ctx = peak_extra(self.device, self.mem.setdefault("ours", {})) if mem else contextlib.nullcontext()
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx:
            rec = next(self.ours)
        total = time.perf_counter() - t0
        g = lambda k: rec.get(f"time_{k}_s", 0.0)  # noqa: E731
        row = {"step_s": total, "gen": g("gen"), "score": g("score"), "ref": g("ref"), "train": g("policy"),
               "optim": g("optim"), "sync": g("sync"),
               "tokens": rec["response_tokens"] * self.p["prompts"] * self.p["G"]}
        self.rows["ours"].append(row)

    def memory_step_ours(self) -> bool:
        return len(self.rows["ours"]) == self.total - 1

    def run(self):
        from transformers import TrainerCallback
        racer = self

        class Begin(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                racer.start_trl_step()
        self.trl.add_callback(Begin())
        self.trl.train()
        for _ in self.ours:  # finish our generator (final save)
            pass


def summarise(rows: dict, mem: dict) -> dict:
    """Medians over the timed steps (the first is a warm-up, the last ran under the memory probe)."""
    out = {}
    for name, rs in rows.items():
        timed = rs[1:-1]
        med = {k: statistics.median(r[k] for r in timed) for k in ("step_s", "tokens", *PHASES)}
        med["tokens_per_s"] = med["tokens"] / med["step_s"]
        med["peak_gib"] = mem.get(name, {}).get("peak_gib")
        out[name] = med
    o, t = out["ours"], out["trl"]
    out["ratios"] = {"step_time": o["step_s"] / t["step_s"], "throughput": o["tokens_per_s"] / t["tokens_per_s"],
                     "peak_memory": (o["peak_gib"] / t["peak_gib"]) if o["peak_gib"] and t["peak_gib"] else None}
    out["ratios"].update({f"time_{k}": (o[k] / t[k]) if t[k] else None for k in PHASES})
    return out


def write(out_dir: str, doc: dict):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trainer", "step_s", "tokens_per_s", "peak_gib", *[f"{k}_s" for k in PHASES]])
        for name in ("trl", "ours"):
            s = doc["summary"][name]
            w.writerow([name, f"{s['step_s']:.4f}", f"{s['tokens_per_s']:.2f}",
                        "" if s["peak_gib"] is None else f"{s['peak_gib']:.4f}", *[f"{s[k]:.4f}" for k in PHASES]])
    import matplotlib  # plotting only here: a bench dependency
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    bottom = {"trl": 0.0, "ours": 0.0}
    for k in PHASES:
        vals = [doc["summary"][n][k] for n in ("trl", "ours")]
        ax[0].bar(["TRL GRPOTrainer", "exgrpo"], vals, bottom=[bottom["trl"], bottom["ours"]], label=k)
        bottom = {"trl": bottom["trl"] + vals[0], "ours": bottom["ours"] + vals[1]}
    ax[0].set_ylabel("seconds per step (median)")
    ax[0].legend(fontsize=7)
    r = doc["summary"]["ratios"]
    ax[0].set_title(f"step: ours {r['step_time']:.2f}x TRL's time, {r['throughput']:.2f}x its throughput", fontsize=9)
    peaks = [doc["summary"][n]["peak_gib"] or 0.0 for n in ("trl", "ours")]
    ax[1].bar(["TRL GRPOTrainer", "exgrpo"], peaks, color=["tab:gray", "tab:green"])
    ax[1].set_ylabel("peak extra tensor memory of a step (GiB)")
    ax[1].set_title(f"memory: ours {r['peak_memory'] or float('nan'):.2f}x TRL's", fontsize=9)
    fig.suptitle(doc["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)


def loopback_server(model_dir: str):
    """A vLLM server on loopback serving the bench's model, with the gloo weight-transfer engine."""
    from exgrpo.vllm_serve import LocalVLLMServer
    return LocalVLLMServer(model_dir, name="student", extra_args=("--weight-transfer-config", '{"backend": "gloo"}',
                                                                  "--logprobs-mode", "processed_logprobs"),
                           extra_env={"VLLM_SERVER_DEV_MODE": "1"})


def server_sync(url: str, model_dir: str, repeats: int) -> dict:
    """Median seconds of a weight push to the server by each path (the policy perturbed before each push, so every
    push carries new weights), and the megabytes each push moves."""
    import transformers

    from exgrpo.vllm_backend import ServerOptions, VLLMServerBackend
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for path in ("file", "gloo"):
        be = VLLMServerBackend(url, "student", tok, [tok.eos_token_id], ServerOptions(weight_transfer=path))
        times = []
        for _ in range(repeats + 1):
            with torch.no_grad():
                for q in model.parameters():
                    q.mul_(1.0001)
            t0 = time.perf_counter()
            be.sync_weights(model)
            times.append(time.perf_counter() - t0)
        out[path] = {"first_push_s": times[0], "push_s": statistics.median(times[1:]),
                     "push_mb": be.last_push_bytes / 2**20, "pushes": repeats}
        be.close()
    out["ratio_gloo_over_file"] = out["gloo"]["push_s"] / out["file"]["push_s"]
    return out


ASYNC_STEPS = (0, 1, 2)


def async_overlap(url: str, p: dict, root: str, model_dir: str, data: str, steps: int) -> dict:
    """Our step in server mode (gloo push) with async_steps 0, 1 and 2, one after the other in this run, each for
    ``steps`` + 1 steps. The throughput compared is the whole run's: trained tokens over the summed step wall time,
    every step counted (an async run fills its pipeline in the first steps and drains it in the last n, which then
    only train: a median step would credit it with work done earlier); the median step after the first is kept
    beside it, with every step's record."""
    import dataclasses
    out = {}
    for a in ASYNC_STEPS:
        cfg = dataclasses.replace(_ours_config(p, root, model_dir, data, steps + 1), backend="vllm-server",
                                  server_url=url, server_model="student", server_weight_transfer="gloo",
                                  async_steps=a, out_dir=os.path.join(root, f"async{a}"))
        every = list(train_steps(cfg))
        rows = every[1:]
        med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
        total_s = sum(r["time_step_s"] for r in every)
        out[f"async_steps={a}"] = {
            "tokens_per_s": sum(r["tokens_per_s"] * r["time_step_s"] for r in every) / total_s, "total_s": total_s,
            "step_s": med("time_step_s"), "median_tokens_per_s": med("tokens_per_s"), "gen_s": med("time_gen_s"),
            "train_s": med("time_policy_s") + med("time_ref_s"), "gen_hidden_s": med("time_gen_hidden_s"),
            "steps": len(every),
            "per_step": [{k: r.get(k) for k in ("time_step_s", "tokens_per_s", "time_gen_s", "time_gen_wait_s",
                                                 "time_gen_hidden_s", "time_sync_s", "staleness")} for r in every]}
    for a in ASYNC_STEPS[1:]:
        out[f"throughput_ratio_{a}"] = out[f"async_steps={a}"]["tokens_per_s"] / out["async_steps=0"]["tokens_per_s"]
    out["throughput_ratio"] = out["throughput_ratio_1"]
    return out


def _versions() -> dict:
    from importlib.metadata import version
    return {"trl": version("trl"), "transformers": version("transformers"),
            "cpu_model": next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")),
                              None) if os.path.exists("/proc/cpuinfo") else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per trainer (default: the preset's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--server-sync", type=int, default=0, metavar="N",
                    help="also time N weight pushes to a loopback vLLM server per path (file, gloo)")
    ap.add_argument("--async-overlap", type=int, default=0, metavar="N",
                    help="also time N steps of ours in server mode with async_steps 0, 1, 2 (vLLM installed)")
    ap.add_argument("--skip-race", action="store_true", help="with --server-sync / --async-overlap: only those")
    a = ap.parse_args(argv)
    if a.skip_race and not (a.server_sync or a.async_overlap):
        ap.error("--skip-race needs --server-sync N or --async-overlap N")
    p = dict(PRESETS[a.preset])
    if a.steps:
        p["steps"] = a.steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.preset == "gpu" and device.type != "cuda":
        ap.error("--preset gpu needs CUDA")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        model_dir = os.path.join(root, "model")
        mc = ModelConfig(**p["model"], dtype="bfloat16" if p["precision"] == "bf16" else "float32")
        model, tok = build_student(mc, seed=0)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        qs = make_split(64, 0, "train", n_ops=2)
        data = os.path.join(root, "prompts.jsonl")
        with open(data, "w") as f:
            for e in qs:
                f.write(json.dumps({"question": e.question, "answer": e.answer, "answer_type": e.answer_type,
                                    "probes": []}) + "\n")
        sync = overlap = None
        if a.server_sync or a.async_overlap:
            srv = loopback_server(model_dir)
            try:
                sync = server_sync(srv.url, model_dir, a.server_sync) if a.server_sync else None
                overlap = async_overlap(srv.url, p, root, model_dir, data, a.async_overlap) if a.async_overlap else None
            finally:
                srv.kill()
        if not a.skip_race:
            racer = Racer(p, root, model_dir, data, [e.question for e in qs], device)
            racer.run()
            summary = summarise(racer.rows, racer.mem)
    shape = p["model"].get("preset") or f"{p['model']['arch']} hidden {p['model']['hidden_size']}, " \
        f"{p['model']['num_layers']} layers, vocab {p['model']['vocab_size']}"
    out = a.out or os.path.join("bench", "results", f"e2e-{a.preset}")
    if sync or overlap:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "server_sync.json")
        old = json.load(open(path)) if os.path.exists(path) else {}  # a part not measured now keeps its last figures
        if old.get("config") == p:
            sync, overlap = sync or old.get("server_sync"), overlap or old.get("async_overlap")
        with open(path + ".tmp", "w") as f:
            json.dump({"title": f"{a.preset}: {shape}; server mode against a loopback vllm serve", "config": p,
                       "environment": {**environment(device), **_versions()}, "server_sync": sync,
                       "async_overlap": overlap}, f, indent=1)
        os.replace(path + ".tmp", path)
        if sync:
            print("server push: " + ", ".join(f"{k} {sync[k]['push_s']:.3f} s ({sync[k]['push_mb']:.0f} MB)"
                                              for k in ("file", "gloo")))
        if overlap:
            print("server mode run: " + ", ".join(f"{k} {v['total_s']:.1f} s, {v['tokens_per_s']:.0f} tok/s"
                                                   for k, v in overlap.items() if k.startswith("async")) +
                  "; async throughput " + ", ".join(f"{overlap[f'throughput_ratio_{k}']:.2f}x (async_steps={k})"
                                                     for k in ASYNC_STEPS[1:]))
        print(f"wrote {out}/server_sync.json")
        if a.skip_race:
            return {"server_sync": sync, "async_overlap": overlap}
    doc = {"title": f"{a.preset}: {shape}; {p['prompts']} prompts x G={p['G']}, {p['completion']} new tokens, dapo, "
                    f"beta 0.04, {p['precision']}", "preset": a.preset, "config": p,
           "environment": {**environment(device), **_versions()}, "steps": racer.rows, "summary": summary}
    if sync or overlap:
        doc.update(server_sync=sync, async_overlap=overlap)
    write(out, doc)
    r = summary["ratios"]
    for name in ("trl", "ours"):
        s = summary[name]
        print(f"{name:5s} step {s['step_s']:.2f} s  " + "  ".join(f"{k} {s[k]:.2f}" for k in PHASES) +
              f"  {s['tokens_per_s']:.0f} tok/s  peak {s['peak_gib'] or float('nan'):.3f} GiB")
    print(f"ours / TRL: time {r['step_time']:.2f}x, throughput {r['throughput']:.2f}x, peak memory "
          f"{r['peak_memory'] or float('nan'):.2f}x; wrote {out}/results.json, results.csv, results.png")
    return doc


if __name__ == "__main__":
    main()
