"""The toy build's first two stages (tokenizer, SFT policy) on their own, to check `mtcore build-toy`'s
byte-for-byte claim without the whole build (issue #14). The steps are build_assets' own, in its order
and from its seeds, so the policy written here is the build's policy. Run it from any source tree
(PYTHONPATH=<tree>) whose toy.build_assets has the same first stages (444545d onwards).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/toy_rebuild.py --out /tmp/sft_a [--bucket-ratio 0]

Prints the final SFT nll (build.json's sft_final_nll), the wall time, and the sha256 of every file
written against the same file under --reference (default: the committed mtcore/toy_assets).
--bucket-ratio overrides mtcore.model.BUCKET_RATIO (0: one bucket padded to the longest sequence,
the SDPA layout before cf8fa47); it is an error on a tree that has no buckets."""
import argparse
import hashlib
import random
import time
from pathlib import Path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", type=Path, default=None)
    ap.add_argument("--bucket-ratio", type=float, default=None)
    a = ap.parse_args()

    import torch

    import mtcore.model as model
    from mtcore import toy
    from mtcore.checkpoint import save_model
    from mtcore.data import Example, encode_sequence, load_tokenizer
    from mtcore.train import SFT, TrainConfig, fit

    if a.bucket_ratio is not None:
        if not hasattr(model, "BUCKET_RATIO"):
            raise SystemExit(f"{model.__file__} has no BUCKET_RATIO")
        model.BUCKET_RATIO = a.bucket_ratio
    reference = a.reference or Path(toy.__file__).parent / "toy_assets"
    seed = toy.ASSET_SEED
    t0 = time.perf_counter()
    # build_assets, steps 1 and 2
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(toy.build_tokenizer(a.out / "tokenizer"))
    splits = toy.make_splits(seed, 0)
    rng = random.Random(seed)
    args = model.ModelArgs(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.convert_tokens_to_ids(toy.EOT),
                           pad_token_id=tokenizer.pad_token_id, **toy.MODEL_SHAPE)
    policy = model.Llama(args, "policy").init_weights(seed)
    demos = []
    for p in splits["sft"]:
        ids, n = encode_sequence(tokenizer, p, toy.demonstration(p, rng))
        demos.append(Example(((ids, n),)))
    log = fit(policy, demos, SFT(), TrainConfig(seed=seed, **toy.SFT_TRAINING), desc="toy sft")
    save_model(policy, a.out / "policy", tokenizer=tokenizer)
    wall = time.perf_counter() - t0
    print(f"source {Path(toy.__file__).parent}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"bucket_ratio {getattr(model, 'BUCKET_RATIO', None)}")
    print(f"sft_final_nll {log[-1]['nll']!r}  wall {wall:.1f} s")
    for f in sorted(p for p in a.out.rglob("*") if p.is_file()):
        rel = f.relative_to(a.out)
        ref = reference / rel
        same = "same" if ref.exists() and sha(ref) == sha(f) else "DIFFERS" if ref.exists() else "no reference"
        print(f"{sha(f)[:16]}  {same:12}  {rel}")


if __name__ == "__main__":
    main()
