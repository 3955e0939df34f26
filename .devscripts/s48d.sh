set -x
mkdir -p $OUT
source .devscripts/fa4env.sh
timeout 330 python benchmarks/kernel_grid.py --lengths 32768 131072 --dims 64 --extra-dims --densities 0.05 0.1 0.2 1.0 --kernels both --also auto --out $OUT/kernels_fa4_d64_s48.json > $OUT/kernels_fa4_d64_s48.log 2>&1
tail -14 $OUT/kernels_fa4_d64_s48.log
PYTHONPATH=$PWD/src timeout 150 python benchmarks/kernel_grid.py --lengths 8192 16384 --dims 64 --extra-dims --densities 0.02 0.05 0.1 0.2 --kernels both --out $OUT/kernels_d64_buckets_s48.json > $OUT/kernels_d64_buckets_s48.log 2>&1
tail -12 $OUT/kernels_d64_buckets_s48.log
timeout 60 python -m pytest -q -m gpu -n 0 tests/ops/test_row_gather.py 2>&1 | tail -3 | tee $OUT/gpu_tests_row_gather_s48.log
