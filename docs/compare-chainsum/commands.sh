# the exact commands behind docs/compare.md (run from the repository root)
FLAGS="--seeds 5 --task chainsum --digits 1 --warm-steps 300 --steps 100 --eval-every 10 --ckpt-every 100 --threads 1 --jobs 1 --no-progress --out runs/compare-chainsum"
rlsd-train compare --methods grpo,rlsd,opsd,grpo+opsd $FLAGS
rlsd-train ablate $FLAGS
