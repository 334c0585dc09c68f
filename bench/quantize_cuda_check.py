"""`qtool quantize --device cuda` against the stored CUDA reference, on the GPU machine.

1. Every source and setting of tests/data/cuda_reference.json (transformers + bitsandbytes on CUDA, tensor
   digests) quantized by qtool on CUDA in this process (plan_quantization + run_quantization, device cuda):
   qtool.quantize.kernel runs on the GPU, the plan comes from qtool.quantize.archplan where it knows the
   architecture; every tensor digest must equal the reference.
2. The CLI in a child process (`python -m qtool quantize SRC --device cuda`, so with the sidecar), compared
   file for file with the in-process run of 1 (no sidecar) for the same source and setting; the child
   reports which of transformers / bitsandbytes it imported (it should be neither).

  PYTHONPATH=/tmp/site:$PWD python3 bench/quantize_cuda_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import runpy, sys
sys.argv = ["qtool", *sys.argv[1:]]
try:
    runpy.run_module("qtool", run_name="__main__")
finally:
    seen = sorted({m.split(".")[0] for m in sys.modules} & {"transformers", "bitsandbytes"})
    print("IMPORTED", ",".join(seen) or "-", file=sys.__stderr__)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cpu: the same checks on the CPU path (a dry run of the script)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import reference_models as rm

    from qtool.core.config import QuantSettings
    from qtool.quantize import plan_quantization, run_quantization

    reference = json.loads((ROOT / "tests" / "data" / "cuda_reference.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="qtool-cuda-check-"))
    rows, t0 = [], time.monotonic()
    try:
        for arch in rm.ARCHS:
            for qt, dq, bs, dt in rm.settings_for(arch):
                src = work / f"{arch}-{dt}"
                if not src.exists():
                    rm.make_source(arch, dt, src)
                s = QuantSettings(quant_type=qt, double_quant=dq, blocksize=bs, dtype=dt)
                key = rm.setting_key(qt, dq, bs, dt)
                out = work / f"q-{arch}-{key}"
                plan = plan_quantization(src, s)
                res = run_quantization(plan, out, device=args.device)
                ours = rm.checkpoint_digests(out)
                ref = reference[arch][key]
                bad = sorted(k for k in set(ours) | set(ref) if ours.get(k) != ref.get(k))
                rows.append({"arch": arch, "setting": key, "device": res.device, "tensors": len(ref),
                             "mismatched": bad[:5], "known_architecture": plan.known_architecture})
        bnb_in_process = "bitsandbytes" in sys.modules
        # 2. the CLI with its sidecar vs the in-process output, file for file
        cli = []
        for arch, key, (qt, dq, bs, dt) in (("llama", "nf4-dq-bs64-bfloat16", ("nf4", True, 64, "bfloat16")),
                                            ("qwen2", "fp4-nodq-bs64-float32", ("fp4", False, 64, "float32"))):
            src, mine = work / f"{arch}-{dt}", work / f"q-{arch}-{key}"
            dest = work / f"cli-{arch}-{key}"
            cmd = [sys.executable, "-c", CHILD, "quantize", str(src), "-o", str(dest), "--device", args.device,
                   "--quant-type", qt, "--double-quant" if dq else "--no-double-quant", "--json"]
            start = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.monotonic() - start
            imported = [ln.split(" ", 1)[1] for ln in p.stderr.splitlines() if ln.startswith("IMPORTED ")]
            files = sorted(x.name for x in dest.iterdir()) if dest.exists() else []
            differ = [f for f in files if not (mine / f).exists() or (mine / f).read_bytes() != (dest / f).read_bytes()]
            differ += [f.name for f in mine.iterdir() if f.name not in files]
            cli.append({"arch": arch, "setting": key, "rc": p.returncode, "wall_s": round(wall, 2),
                        "imported": imported, "files": files, "differ": differ,
                        "stderr_tail": p.stderr[-400:] if p.returncode else ""})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in rows if r["mismatched"] or r["device"] != args.device]
    summary = {"settings": len(rows), "tensors": sum(r["tensors"] for r in rows), "failed": bad,
               "known_architecture": sorted({r["arch"] for r in rows if r["known_architecture"]}),
               "bitsandbytes_imported_in_process": bnb_in_process, "cli": cli,
               "seconds": round(time.monotonic() - t0, 1)}
    (args.out / "quantize_cuda_check.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(f"quantize --device {args.device} vs CUDA reference: {summary['settings']} settings, {summary['tensors']} tensors, "
          f"{len(bad)} failed; archplan used for {summary['known_architecture']}; bitsandbytes imported: "
          f"{bnb_in_process} ({summary['seconds']} s)")
    for r in bad[:5]:
        print("   FAIL", r)
    for c in cli:
        print(f"   CLI {c['arch']} {c['setting']}: rc {c['rc']}, {c['wall_s']} s, imported {c['imported']}, "
              f"{len(c['files'])} files, differ from in-process: {c['differ'] or 'none'} {c['stderr_tail']}")


if __name__ == "__main__":
    main()
