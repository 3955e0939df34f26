set -x
mkdir -p $OUT
source .devscripts/fa4env.sh
timeout 380 python benchmarks/kernel_grid.py --lengths 32768 131072 --dims 64 --extra-dims --densities 0.05 0.1 0.2 1.0 --kernels both --also auto --out $OUT/kernels_fa4_d64_s48.json 2>&1 | tail -12 | tee $OUT/kernels_fa4_d64_s48.log
timeout 150 python benchmarks/kernel_grid.py --lengths 8192 16384 --dims 64 --extra-dims --densities 0.02 0.05 0.1 0.2 --kernels both --also auto --out $OUT/kernels_d64_buckets_s48.json 2>&1 | tail -12 | tee $OUT/kernels_d64_buckets_s48.log
