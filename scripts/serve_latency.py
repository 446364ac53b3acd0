#!/usr/bin/env python3
"""The web app's speed goals, measured (docs/perf.md, "serve"): the page's load time, how long
a learning step takes to reach a client of /api/events, and what serving adds to a learning
run (a served `learn` against the same command run directly). Standard library only.

    python3 scripts/serve_latency.py [--bin target/release/hifi-tuner] [--steps 300]
"""
import argparse, json, os, shutil, statistics, subprocess, tempfile, threading, time, urllib.request, uuid

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/hifi-tuner")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--rounds", type=int, default=2)
a = p.parse_args()
root = tempfile.mkdtemp(prefix="serve-latency-")
subprocess.run([a.bin, "world", "--out", f"{root}/w", "--samples", "0"], check=True, capture_output=True)
photos = sorted(f"{root}/w/dataset/banded_ball/{f}" for f in os.listdir(f"{root}/w/dataset/banded_ball"))
masks = sorted(f"{root}/w/masks/banded_ball/{f}" for f in os.listdir(f"{root}/w/masks/banded_ball"))

srv = subprocess.Popen([a.bin, "serve", "--data", f"{root}/data", "--port", "0", "--device", "cpu"],
                       stdout=subprocess.PIPE, text=True)
url = srv.stdout.readline().split("listening on ")[1].strip()


def get(path):
    return urllib.request.urlopen(url + path.lstrip("/")).read()


def post_json(path, body):
    r = urllib.request.Request(url + path.lstrip("/"), json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(r).read())


def multipart(path, fields, files):
    b = uuid.uuid4().hex
    body = b""
    for k, v in fields.items():
        body += f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for k, fn in files:
        body += f'--{b}\r\nContent-Disposition: form-data; name="{k}"; filename="{os.path.basename(fn)}"\r\n\r\n'.encode()
        body += open(fn, "rb").read() + b"\r\n"
    body += f"--{b}--\r\n".encode()
    r = urllib.request.Request(url + path.lstrip("/"), body, {"Content-Type": f"multipart/form-data; boundary={b}"})
    return json.loads(urllib.request.urlopen(r).read())


# 1. the page and its first API call, warm
loads = []
for _ in range(30):
    t = time.perf_counter(); get("/"); get("/api/config"); get("/api/subjects"); loads.append(time.perf_counter() - t)
print(f"page + config + subjects: median {1e3 * statistics.median(loads):.1f} ms, max {1e3 * max(loads):.1f} ms ({len(get('/'))} bytes)")

sid = multipart("/api/subjects", {"name": "ball", "class_noun": "ball"},
                [("photos", f) for f in photos] + [("masks", f) for f in masks])["id"]

# 2. step → event latency: when an event arrives, the age of the log line it reports
lat = []


def listen(job_id, stop):
    r = urllib.request.urlopen(url + "api/events")
    for line in r:
        if stop.is_set():
            return
        line = line.decode().strip()
        if not line.startswith("data:"):
            continue
        now = time.time()
        v = json.loads(line[5:])
        log = f"{root}/data/jobs/{v['id']}/out/train_log.jsonl"
        if v["id"] == job_id and os.path.exists(log) and v["step"] > 0:
            lat.append(now - os.stat(log).st_mtime)


def s_per_step(log):
    rows = [json.loads(l) for l in open(log)]
    return (rows[-1]["seconds"] - rows[0]["seconds"]) / (len(rows) - 1)


served, direct = [], []
for r in range(a.rounds):
    job = post_json(f"/api/subjects/{sid}/learn", {"mode": "ti", "steps": a.steps, "preview_every": 0})["job"]
    stop = threading.Event()
    th = threading.Thread(target=listen, args=(job, stop), daemon=True); th.start()
    while json.loads(get(f"/api/jobs/{job}"))["state"] in ("queued", "running"):
        time.sleep(0.2)
    stop.set()
    served.append(s_per_step(f"{root}/data/jobs/{job}/out/train_log.jsonl"))
    out = f"{root}/direct{r}"
    subprocess.run([a.bin, "learn", "--model", "assets/world-model", "--images", f"{root}/data/subjects/{sid}/photos",
                    "--masks", f"{root}/data/subjects/{sid}/masks", "--class-noun", "ball", "--mode", "ti",
                    "--steps", str(a.steps), "--device", "cpu", "--out", out], check=True, capture_output=True)
    direct.append(s_per_step(f"{out}/train_log.jsonl"))
print(f"step → event: median {1e3 * statistics.median(lat):.0f} ms, max {1e3 * max(lat):.0f} ms over {len(lat)} events")
print(f"learn (ti, {a.steps} steps) s/step served {[round(x, 4) for x in served]}, direct {[round(x, 4) for x in direct]}: "
      f"served / direct = {statistics.mean(served) / statistics.mean(direct):.3f}")
srv.terminate(); srv.wait()
shutil.rmtree(root)
