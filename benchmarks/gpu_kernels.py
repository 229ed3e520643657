"""GPU check and timing of the message kernels (Triton and CUDA) against the cuBLAS FP32 GEMM.

One plain script for one GPU session (about 5 minutes on an H100):

    OUT=/tmp/hnca-kernels python benchmarks/gpu_kernels.py            # or --budget 240 --skip-cuda

1. Accuracy: every backend's three messages against the float64 reference on a small random
   layer (both unit codings, saturated logits), as ||ref - fast|| / ||ref||; at the large shape
   the Triton and CUDA messages against each other.
2. Timing, float32 with TF32 off, medians of ``triton.testing.do_bench``: the Bernoulli message,
   the entropy delta and the softmax message (K = 10 and K = in) of each backend, the Triton
   kernels at each candidate tile as well as autotuned (which tile autotune picked is printed),
   and ``x @ W.T`` (cuBLAS FP32) at the same shape, at B = 4096, in = out = 4096 and at the
   paper's B = 50, 200 x 200 (there also the host time per call and a CUDA-graph replay).
3. A table (ms, T terms/s, ratio to the GEMM) on stdout, and JSON in $OUT/kernels.json.

Each case runs in its own try/except (an error is printed and the run goes on) and the run stops
starting new cases past --budget seconds. The CUDA extension builds in a background thread while
the Triton kernels compile and run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hnca_kernels import functional as Fn  # noqa: E402
from hnca_kernels import backends  # noqa: E402
from hnca_kernels.ops import reference  # noqa: E402

START = time.perf_counter()
RESULTS: dict = {"cases": [], "accuracy": [], "errors": [], "autotune": {}}
OUTPUTS: dict = {}  # shape -> {(backend, message): d}, for the two GPU backends' agreement
DEVICE = "cuda"  # "cpu" under --dry-run (the interpreter, tiny shapes: checks this script, times nothing)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def elapsed() -> float:
    return time.perf_counter() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def guarded(name, fn, budget):
    """Run fn() unless the budget is spent; print and record any error, then go on."""
    if elapsed() > budget:
        log(f"skip {name}: budget of {budget:.0f}s spent")
        RESULTS["errors"].append({"case": name, "error": "skipped: budget spent"})
        return None
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and continues
        log(f"FAILED {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=3)
        RESULTS["errors"].append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
        return None


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return ((ref - out.double().cpu()).norm() / ref.norm().clamp_min(1e-300)).item()


# ---- layers ----------------------------------------------------------------------------------

def layer(B, n_in, n_out, coding, *, seed=0, w_scale=None, logit_range=None, dtype=torch.float32):
    """Parents x (+-1 or 0/1), Glorot weights (or randn * w_scale), logits x @ W.T + bias (clamped
    to +-logit_range), samples y of the logits, and a softmax sample a."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lo, hi = (-1.0, 1.0) if coding == "pm1" else (0.0, 1.0)
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi).double()
    if w_scale is None:
        bound = (6.0 / (n_in + n_out)) ** 0.5
        weight = (torch.rand(n_out, n_in, generator=g).double() * 2 - 1) * bound
    else:
        weight = torch.randn(n_out, n_in, generator=g).double() * w_scale
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    logits = x @ weight.t() + (torch.rand(n_out, generator=g).double().to(DEVICE) * 2 - 1) * (logit_range or 1.0)
    if logit_range is not None:
        logits = logits.clamp(-logit_range, logit_range)
    y = torch.where(torch.rand(B, n_out, generator=g).double().to(DEVICE) < torch.sigmoid(logits), hi, lo)
    a = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).squeeze(1).to(DEVICE)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), cast(logits), cast(y), a, (lo, hi)


def messages(backend, x, weight, logits, y, a, pv):
    return {
        "bernoulli": lambda: Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend=backend),
        "entropy": lambda: Fn.counterfactual_entropy_delta(x, weight, logits, parent_values=pv, backend=backend),
        "categorical": lambda: Fn.categorical_counterfactual_log_ratio(x, weight, logits, a, parent_values=pv,
                                                                       backend=backend),
    }


# ---- accuracy --------------------------------------------------------------------------------

def check_accuracy(gpu_backends):
    """Each backend against the float64 reference on small layers (both codings; Glorot and
    saturated/large-weight regimes), float32 and float64 inputs. The Triton kernels run at one
    fixed tile here (autotuning every small shape and dtype would cost compile time)."""
    if "triton" in gpu_backends and DEVICE == "cuda":
        from hnca_kernels.ops import triton as T

        for kind, specs in (("bernoulli", T._BERNOULLI_SPECS), ("entropy", T._ENTROPY_SPECS),
                            ("categorical", T._CATEGORICAL_SPECS)):
            T._FORCED_TILE[kind] = specs[0]
    try:
        _check_accuracy(gpu_backends)
    finally:
        if "triton" in gpu_backends and DEVICE == "cuda":
            T._FORCED_TILE.update(bernoulli=None, entropy=None, categorical=None)


QUICK = False  # --quick: one layer, float32


def _check_accuracy(gpu_backends):
    shapes = [(96, 130, 70, "pm1", None, None), (33, 77, 129, "01", 2.0, 60.0), (50, 200, 200, "pm1", 10.0, 60.0)]
    if DEVICE != "cuda":
        shapes = [(9, 13, 7, "pm1", None, None), (5, 11, 9, "01", 2.0, 60.0), (6, 10, 8, "pm1", 10.0, 60.0)]
    if QUICK:
        shapes = shapes[:1]
    for B, n_in, n_out, coding, w_scale, lr in shapes:
        x, weight, logits, y, a, pv = layer(B, n_in, n_out, coding, w_scale=w_scale, logit_range=lr,
                                            dtype=torch.float64)
        refs = {
            "bernoulli": reference.bernoulli_log_ratio(x, weight, logits, y, *pv),
            "entropy": reference.entropy_delta(x, weight, logits, *pv),
            "categorical": reference.categorical_log_ratio(x, weight, logits, a, *pv),
        }
        for backend in gpu_backends:
            for dtype in (torch.float32,) if QUICK else (torch.float32, torch.float64):
                args = [t.to(dtype) for t in (x, weight, logits, y)]
                for kind, fn in messages(backend, *args[:3], args[3], a, pv).items():
                    err = rel_err(refs[kind], fn())
                    limit = 2e-5 if dtype == torch.float32 else 1e-10
                    status = "ok" if err < limit else "TOO LARGE"
                    shape = f"{B}x{n_in}x{n_out} {coding} w={w_scale or 'glorot'}"
                    log(f"accuracy {backend:6s} {kind:11s} {str(dtype)[6:]:8s} {shape:28s} rel err {err:.2e} {status}")
                    RESULTS["accuracy"].append({"backend": backend, "message": kind, "dtype": str(dtype),
                                                "shape": shape, "rel_err": err, "ok": err < limit})


# ---- timing ----------------------------------------------------------------------------------

def bench(fn, rep_ms):
    if DEVICE != "cuda":  # --dry-run: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")


def record(shape, case, ms, terms, gemm_ms=None, extra=None):
    entry = {"shape": shape, "case": case, "ms": ms, "terms": terms, "T_terms_per_s": terms / ms / 1e9}
    if gemm_ms:
        entry["ratio_to_gemm"] = ms / gemm_ms
    entry.update(extra or {})
    RESULTS["cases"].append(entry)
    ratio = f"{ms / gemm_ms:7.2f}x" if gemm_ms else "      -"
    log(f"{shape:14s} {case:46s} {ms:9.4f} ms {terms / ms / 1e9:8.3f} T/s  {ratio}")


def time_shape(name, B, n_in, n_out, gpu_backends, budget, rep_ms, tiles):
    from hnca_kernels.ops import triton as T

    x, weight, logits, y, a, pv = layer(B, n_in, n_out, "pm1")
    terms = B * n_in * n_out
    gemm = bench(lambda: x @ weight.t(), rep_ms)
    record(name, "gemm cuBLAS fp32 (x @ W.T, TF32 off)", gemm, terms)
    g = torch.Generator().manual_seed(1)
    k10 = (torch.randn(10, n_in, generator=g) * (6 / (n_in + 10)) ** 0.5).to(DEVICE)
    logits10 = x @ k10.t()
    a10 = torch.multinomial(torch.softmax(logits10, -1).cpu(), 1, generator=g).squeeze(1).to(DEVICE)
    outputs = OUTPUTS.setdefault(name, {})
    for backend in gpu_backends:
        calls = messages(backend, x, weight, logits, y, a, pv)
        calls["categorical K=10"] = lambda b=backend: Fn.categorical_counterfactual_log_ratio(
            x, k10, logits10, a10, parent_values=pv, backend=b)
        for kind, fn in calls.items():
            def run(kind=kind, fn=fn, backend=backend):
                outputs[(backend, kind)] = fn()  # compiles (and autotunes) outside the timing
                sync()
                ms = bench(fn, rep_ms)
                n = B * n_in * (10 if kind.endswith("K=10") else n_out)
                label = f"{backend} {'categorical K=' + str(n_out) if kind == 'categorical' else kind}"
                extra = {}
                if backend == "triton" and not kind.endswith("K=10"):
                    tuned = T.tuned_kernel(kind if kind != "categorical" else "categorical")
                    best = getattr(tuned, "best_config", None)
                    if best is not None:
                        extra["autotune"] = str(best)
                        RESULTS["autotune"][f"{name}/{kind}"] = str(best)
                        label += " (autotuned)"
                record(name, label, ms, n, gemm, extra)
            guarded(f"{name} {backend} {kind}", run, budget)
    # Triton at each candidate tile (the autotuner's compiled kernels are reused)
    if "triton" in gpu_backends and tiles:
        specs = {"bernoulli": T._BERNOULLI_SPECS, "entropy": T._ENTROPY_SPECS, "categorical": T._CATEGORICAL_SPECS}
        for kind, spec_list in specs.items():
            fn = messages("triton", x, weight, logits, y, a, pv)[kind]
            for spec in spec_list:
                def run(kind=kind, fn=fn, spec=spec):
                    T._FORCED_TILE[kind] = spec
                    try:
                        fn()
                        sync()
                        ms = bench(fn, rep_ms)
                    finally:
                        T._FORCED_TILE[kind] = None
                    bb, bi, nw, reg = spec
                    record(name, f"triton {kind} tile {bb}x{bi} w{nw} r{reg or '-'}", ms, terms, gemm,
                           {"tile": list(spec)})
                guarded(f"{name} triton {kind} tile {spec}", run, budget)
    # the two GPU backends against each other (no float64 reference at this size)
    for kind in ("bernoulli", "entropy", "categorical", "categorical K=10"):
        for other in ("cuda", "cpp"):  # cpp stands in for cuda in --dry-run
            if ("triton", kind) in outputs and (other, kind) in outputs and other in gpu_backends:
                err = rel_err(outputs[(other, kind)], outputs[("triton", kind)])
                log(f"{name} triton vs {other} {kind}: rel diff {err:.2e}")
                RESULTS["accuracy"].append({"backend": f"triton-vs-{other}", "message": kind, "shape": name,
                                            "rel_err": err})
    return x, weight, logits, y, a, pv


def host_overhead(name, gpu_backends, x, weight, logits, y, pv, budget):
    """The paper shape is host-bound: time per call on the host, and a CUDA-graph replay."""
    for backend in gpu_backends:
        fn = lambda b=backend: Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend=b)  # noqa: E731

        def run(fn=fn, backend=backend):
            for _ in range(20 if DEVICE == "cuda" else 1):
                fn()
            sync()
            n, t0 = (200 if DEVICE == "cuda" else 2), time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            per_call = (time.perf_counter() - t0) / n * 1e3
            terms = x.shape[0] * x.shape[1] * weight.shape[0]
            record(name, f"{backend} bernoulli: host wall per call", per_call, terms)
            if DEVICE != "cuda":
                return
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            ms = bench(graph.replay, 50)
            record(name, f"{backend} bernoulli: CUDA graph replay", ms, terms)
        guarded(f"{name} {backend} host overhead", run, budget)


def print_table():
    print("\n## hnca message kernels")
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (dry run)'}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, TF32 off")
    print("| shape | case | ms (median) | T terms/s | / GEMM |")
    print("| --- | --- | --- | --- | --- |")
    for c in RESULTS["cases"]:
        ratio = f"{c['ratio_to_gemm']:.2f}x" if "ratio_to_gemm" in c else ""
        print(f"| {c['shape']} | {c['case']} | {c['ms']:.4f} | {c['T_terms_per_s']:.3f} | {ratio} |")
    if RESULTS["autotune"]:
        print("\nautotune picks:")
        for k, v in RESULTS["autotune"].items():
            print(f"  {k}: {v}")
    bad = [a for a in RESULTS["accuracy"] if a.get("ok") is False]
    print(f"\naccuracy: {len(RESULTS['accuracy'])} checks, {len(bad)} over the limit")
    for a in bad:
        print(f"  {a}")
    print(f"errors: {len(RESULTS['errors'])}")
    for e in RESULTS["errors"]:
        print(f"  {e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=270.0, help="stop starting cases after this many seconds")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time per case (ms)")
    parser.add_argument("--skip-cuda", action="store_true", help="leave out the CUDA extension (no build)")
    parser.add_argument("--no-tiles", action="store_true", help="time the autotuned Triton kernels only")
    parser.add_argument("--large", default="4096,4096,4096", help="B,in,out of the large shape")
    parser.add_argument("--quick", action="store_true",
                        help="accuracy on one layer in float32 only (the tests check the rest)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreted, tiny shapes, cpp in place of cuda: checks the script only")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        args.large = "7,12,9"
        args.budget = float("inf")
    elif not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a GPU (or --dry-run)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    log(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'dry run on the CPU'}, torch {torch.__version__}")

    # the CUDA extension builds (nvcc, minutes) while the Triton kernels compile and run
    build = {}
    if not args.skip_cuda:
        from hnca_kernels.ops import _extension

        if DEVICE == "cuda":
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ".".join(map(str, torch.cuda.get_device_capability())))
        thread = threading.Thread(target=lambda: build.update(result=_extension.load_cuda()), daemon=True)
        thread.start()

    global QUICK
    QUICK = args.quick
    gpu = ["triton"] if backends.is_available("triton", DEVICE) else []
    if not gpu:
        log(f"triton unavailable: {backends.unavailable_reason('triton', DEVICE)}")
    B, n_in, n_out = map(int, args.large.split(","))
    big = f"{B}x{n_in}x{n_out}"
    small = (50, 200, 200) if DEVICE == "cuda" else (6, 10, 12)
    paper_name = "x".join(map(str, small))
    # the question first: each backend's messages at the large shape against the GEMM
    guarded("accuracy triton", lambda: check_accuracy(gpu), args.budget)
    guarded(f"timing {big} triton", lambda: time_shape(big, B, n_in, n_out, gpu, args.budget, args.rep,
                                                          not args.no_tiles), args.budget)
    cuda = []
    if not args.skip_cuda:
        thread.join(timeout=min(3600.0, max(1.0, args.budget - elapsed())))
        log(f"CUDA extension: {build.get('result', 'still building')}")
        if thread.is_alive():
            log("the CUDA extension is still building: the cuda backend is left out")
            RESULTS["errors"].append({"case": "cuda build", "error": "still building at the budget"})
        elif backends.is_available("cuda" if DEVICE == "cuda" else "cpp", DEVICE):
            cuda = ["cuda" if DEVICE == "cuda" else "cpp"]
            guarded("accuracy cuda", lambda: check_accuracy(cuda), args.budget)
            guarded(f"timing {big} cuda", lambda: time_shape(big, B, n_in, n_out, cuda, args.budget, args.rep,
                                                               False), args.budget)
        else:
            log(f"cuda backend unavailable: {backends.unavailable_reason('cuda', DEVICE)}")
    # then the paper's shape, where the host's time per call matters
    for name, which, tiles in (("triton", gpu, not args.no_tiles), ("cuda", cuda, False)):
        if not which:
            continue
        paper = guarded(f"timing paper {name}", lambda: time_shape(paper_name, *small, which, args.budget, 50,
                                                                   tiles), args.budget)
        if paper is not None:
            x, weight, logits, y, _, pv = paper
            host_overhead(paper_name, which, x, weight, logits, y, pv, args.budget)

    print_table()
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        RESULTS["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
        RESULTS["versions"] = {"torch": torch.__version__, "triton": __import__("triton").__version__}
        RESULTS["seconds"] = elapsed()
        (Path(out) / "kernels.json").write_text(json.dumps(RESULTS, indent=1))
        log(f"wrote {out}/kernels.json")


if __name__ == "__main__":
    main()
