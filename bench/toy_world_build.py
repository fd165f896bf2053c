"""An experimental toy world for issue #14: the off-policy base RM (`build-toy --base-rm offpolicy`,
trained on swap-only answers, never a duplicated digit) beside an SFT policy whose demonstrations'
errors are of one kind only, so that the policy's errors fall on the RM's blind spot (duplicates:
the RM never saw a wrong length) or in its view (swaps). Everything else is build_assets' own
(the same seeds, recipe and shapes); only toy.CORRUPTIONS, which `demonstration` reads at each call,
is narrowed for the build. Not a default: the committed assets are untouched.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/toy_world_build.py --out DIR --errors duplicate
        [--p-error 0.8]   # a weaker initial policy: that share of its demonstrations is wrong (default 0.5)
    python bench/study.py --assets DIR ...
"""
import argparse
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--errors", choices=("duplicate", "swap"), required=True,
                    help="the demonstrations' only corruption")
    ap.add_argument("--p-error", type=float, default=0.5, help="the share of wrong demonstrations (toy's 0.5)")
    a = ap.parse_args()

    import torch

    from mtcore import toy

    torch.set_num_threads(1)
    toy.CORRUPTIONS = {"duplicate": (toy._duplicate_digit,), "swap": (toy._swap_adjacent,)}[a.errors]
    demonstration = toy.demonstration  # read by build_assets at each call, like CORRUPTIONS
    toy.demonstration = lambda prompt, rng: demonstration(prompt, rng, p_error=a.p_error)
    t0 = time.perf_counter()
    toy.build_assets(a.out, base_rm="offpolicy")
    print(f"built {a.out} (demonstration errors: {a.errors} only, p_error {a.p_error}) in {time.perf_counter() - t0:.0f} s")
    print((a.out / "build.json").read_text())


if __name__ == "__main__":
    main()
