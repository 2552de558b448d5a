"""Per-kernel GPU time of one forward+backward, fieldkit's cuda backend next to gsplat (torch.profiler).

    python benchmarks/profile_cuda.py --scene b          # scenes as in benchmarks/rasterize.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rasterize import DEFAULT_DATA, build_scene  # noqa: E402

from fieldkit.render import rasterize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scene", default="b")
    parser.add_argument("--backends", default="cuda,gsplat")
    parser.add_argument("--rows", type=int, default=14)
    args = parser.parse_args()
    means, quats, scales, opacities, colors, cameras = build_scene(DEFAULT_DATA, args.scene, "cuda")
    w = torch.randn(len(cameras), cameras.height, cameras.width, 3, device="cuda")

    def step(backend: str) -> None:
        params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colors)]
        out = rasterize(*params, cameras, backend=backend)
        ((out.rgb * w).sum() + out.alpha.sum()).backward()

    for backend in args.backends.split(","):
        for _ in range(3):
            step(backend)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(backend)
            torch.cuda.synchronize()
        print(f"\n### {backend}, scene {args.scene}: 5 x forward+backward")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
