"""Cost of capture: q/k of every layer streamed to a probe that keeps nothing, against the plain forward.

Each mode runs in its own process so that peak memory (CUDA: max allocated; CPU: peak RSS growth over the
loaded model) is its own. Prints times, peaks and the ratios capture / plain. Target (issue 2): at most
+10 % time and +20 % peak memory on SmolLM2-135M at 4096 tokens.

    python benchmarks/capture_cost.py [--model smollm2-135m] [--tokens 4096] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def measure(model_name: str, n_tokens: int, repeats: int, device: str, mode: str) -> dict:
    import torch

    import interp
    from interp.hooks import capture

    torch.manual_seed(0)
    model = interp.load_model(model_name, dtype="float32", device=device)
    ids = torch.randint(100, model.config.vocab_size, (1, n_tokens), device=device)
    cuda = device.startswith("cuda")

    def run():
        with torch.no_grad():
            if mode == "plain":
                model.hf(input_ids=ids)
            else:
                with capture(model, lambda call: None, keep=("q", "k")):
                    model.hf(input_ids=ids)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds": min(times), "peak_bytes": peak, "peak_over_model_bytes": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--_child", choices=("plain", "capture"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(measure(args.model, args.tokens, args.repeats, args.device, args._child)))
        return
    results = {}
    for mode in ("plain", "capture"):
        cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
               "--repeats", str(args.repeats), "--device", args.device, "--_child", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    import torch

    print(f"model {args.model}, {args.tokens} tokens, fp32, device {args.device}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, best of {args.repeats}")
    for mode, r in results.items():
        print(f"  {mode:<8} {r['seconds']:8.2f} s   peak {r['peak_bytes'] / 2**30:6.2f} GiB   "
              f"(+{r['peak_over_model_bytes'] / 2**30:.2f} GiB over the loaded model)")
    p, c = results["plain"], results["capture"]
    print(f"  ratio capture/plain: time {c['seconds'] / p['seconds']:.3f}x, peak {c['peak_bytes'] / p['peak_bytes']:.3f}x, "
          f"peak over model {c['peak_over_model_bytes'] / max(p['peak_over_model_bytes'], 1):.3f}x")


if __name__ == "__main__":
    main()
