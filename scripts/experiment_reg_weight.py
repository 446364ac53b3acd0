"""Sweep of w_s (--reg-weight) and of the conditioning space on a model, with the learn CLI.

Usage (by hand): python3 scripts/experiment_reg_weight.py MODEL IMAGES MASKS CLASS OUTDIR [STEPS]
Prints a Markdown table: w_s, space, steps/s, mean masked denoising loss over the last third of
the run, and ‖c_s − φ_s‖_F at the end. φ_s of each space is read from a `--steps 0` run (c_s
is initialised to φ_s, so such a run writes φ_s itself).
"""
import json, subprocess, sys, os, struct

model, images, masks, cls, out = sys.argv[1:6]
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 300
binary = os.environ.get("HIFI_TUNER", "target/release/hifi-tuner")

def read_c_s(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        info = head["c_s"]
        f.seek(8 + n + info["data_offsets"][0])
        raw = f.read(info["data_offsets"][1] - info["data_offsets"][0])
    vals = struct.unpack(f"<{len(raw)//4}f", raw)
    return vals

def learn(d, space, w, n):
    subprocess.run(["rm", "-rf", d])
    subprocess.run([binary, "learn", "--model", model, "--images", images, "--masks", masks, "--class-noun", cls,
                    "--out", d, "--steps", str(n), "--stepwise-steps", "0", "--space", space,
                    "--reg-weight", str(w), "--device", "cpu", "--checkpoint-every", "0"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

phi = {}
for space in ("input", "output"):
    learn(os.path.join(out, f"phi-{space}"), space, 0.0, 0)
    phi[space] = read_c_s(os.path.join(out, f"phi-{space}", "subject.safetensors"))

print("| w_s | space | steps/s | masked loss (last third) | ‖c_s − φ_s‖ |")
print("|---|---|---|---|---|")
for space, w in [("input", 0.0), ("input", 1e-4), ("input", 1e-3), ("input", 1e-2), ("input", 1e-1), ("input", 1.0), ("output", 0.0), ("output", 1e-3)]:
    d = os.path.join(out, f"{space}-{w:g}")
    learn(d, space, w, steps)
    log = [json.loads(l) for l in open(os.path.join(d, "train_log.jsonl"))]
    rate = (len(log) - 11) / (log[-1]["seconds"] - log[10]["seconds"])  # steady state
    tail = log[-(steps // 3):]
    den = sum(r["loss_denoise"] for r in tail) / len(tail)
    c = read_c_s(os.path.join(d, "subject.safetensors"))
    dist = sum((a - b) ** 2 for a, b in zip(c, phi[space])) ** 0.5
    print(f"| {w:g} | {space} | {rate:.1f} | {den:.4f} | {dist:.3f} |", flush=True)
