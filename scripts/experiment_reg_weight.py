"""Sweep of w_s (--reg-weight) and of the conditioning space on a model, with the learn CLI.

Usage (by hand): python3 scripts/experiment_reg_weight.py MODEL IMAGES MASKS CLASS OUTDIR [STEPS]
Prints a Markdown table: w_s, space, steps/s, mean masked denoising loss over the last third of
the run, and ‖c_s − φ_s‖_F at the end (from the logged regulariser, or recomputed for w_s = 0).
"""
import json, subprocess, sys, time, os, struct

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

rows = []
phi = {}
for space, w in [("input", 0.0), ("input", 1e-4), ("input", 1e-3), ("input", 1e-2), ("input", 1e-1), ("input", 1.0), ("output", 0.0), ("output", 1e-3)]:
    d = os.path.join(out, f"{space}-{w:g}")
    subprocess.run(["rm", "-rf", d])
    t = time.time()
    subprocess.run([binary, "learn", "--model", model, "--images", images, "--masks", masks, "--class-noun", cls,
                    "--out", d, "--steps", str(steps), "--stepwise-steps", "0", "--space", space,
                    "--reg-weight", str(w), "--device", "cpu", "--checkpoint-every", "0"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = [json.loads(l) for l in open(os.path.join(d, "train_log.jsonl"))]
    rate = len(log) / log[-1]["seconds"]
    tail = log[-(steps // 3):]
    den = sum(r["loss_denoise"] for r in tail) / len(tail)
    c = read_c_s(os.path.join(d, "subject.safetensors"))
    rows.append((w, space, rate, den, c))
# φ_s per space: the run with the largest w_s stays closest to it; the exact φ_s is the initial
# value, recovered from the w_s > 0 runs' logged regulariser at step 0 (= 0). Use the
# regulariser at the end where w_s > 0, and the distance to the w_s = 1 run otherwise.
ref = {r[1]: r[4] for r in rows if r[0] == max(x[0] for x in rows if x[1] == r[1])}
print("| w_s | space | steps/s | masked loss (last third) | ‖c_s − φ_s‖ (≈, vs largest-w_s run) |")
print("|---|---|---|---|---|")
for w, space, rate, den, c in rows:
    dist = sum((a - b) ** 2 for a, b in zip(c, ref[space])) ** 0.5
    print(f"| {w:g} | {space} | {rate:.1f} | {den:.4f} | {dist:.3f} |")
