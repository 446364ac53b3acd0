#!/usr/bin/env python3
"""Turns scripts/device_bench.sh's bench.jsonl into the Markdown section of docs/perf.md:
ours vs diffusers on the same work, ratios, and MFU against the GPU's dense bf16 peak.

    python3 scripts/perf_table.py bench.jsonl "NVIDIA H100 80GB HBM3" PEAK_MIB
"""

import json
import sys

# Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s, no sparsity).
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
    gpu, peak_mib = sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "?"
    peak = next((v for k, v in PEAKS.items() if k in gpu), None)

    def get(run, what, **kw):
        for r in rows:
            if r.get("run") == run and r.get("what") == what and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    out = [f"## GPU: {gpu} (SD-1.5 shapes, random weights, 512², DDIM 50 steps)", ""]
    out.append("| work | dtype | ours | diffusers 0.42.1 | ours / diffusers (speed) |")
    out.append("|---|---|---|---|---|")
    flops = None
    for dt, tdt in (("fp16", "float16"), ("bf16", "bfloat16")):
        g, d = get(f"ours-{dt}", "generate"), get("diffusers", "diffusers_pipeline", dtype=tdt)
        if g and d:
            out.append(f"| one image (50 steps, w = 7.5) | {dt} | {g['seconds']:.2f} s | {d['seconds']:.2f} s | "
                       f"{d['seconds'] / g['seconds']:.2f}× |")
        ti, dd = get(f"ours-{dt}", "learn", mode="ti"), get("diffusers", "diffusers_unet_fwd_bwd", dtype=tdt)
        if ti and dd:
            flops = dd["flops_per_step"]
            mfu = lambda sps: f" (MFU {100 * flops * sps / (peak * 1e12):.1f} %)" if peak else ""  # noqa: E731
            out.append(f"| TI step: text encoder + UNet fwd + bwd | {dt} | {ti['steps_per_second']:.2f} steps/s"
                       f"{mfu(ti['steps_per_second'])} | {dd['steps_per_second']:.2f} steps/s{mfu(dd['steps_per_second'])} | "
                       f"{ti['steps_per_second'] / dd['steps_per_second']:.2f}× |")
    out += ["", "| ours | dtype | number |", "|---|---|---|"]
    for dt in ("fp16", "bf16"):
        run = f"ours-{dt}"
        for what, key, unit in (("learn", "steps_per_second", "steps/s (hifi, input space)"),
                                ("reference_guidance", "seconds", "s per reference-guided image"),
                                ("null_text_inversion", "inner_steps_per_second", "NTI Adam steps/s"),
                                ("replace", "seconds_with_inversion", "s per replacement, inversion included")):
            r = get(run, what, **({"mode": "hifi", "space": "input"} if what == "learn" else {}))
            if r:
                out.append(f"| {what} | {dt} | {r[key]:.2f} {unit} |")
        learn = get(run, "learn", mode="hifi", space="input")
        if learn:
            # The job: 1000 steps of c_s + 50 × 10 step-wise steps.
            out.append(f"| learn a subject (1000 + 50×10 steps), projected | {dt} | {1500 / learn['steps_per_second']:.1f} s |")
    out += ["", f"Peak GPU memory over the whole run (all processes): {peak_mib} MiB."]
    if flops:
        out.append(f"FLOPs of one TI step (torch.utils.flop_counter on diffusers' modules): {flops / 1e12:.3f} TFLOP.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
