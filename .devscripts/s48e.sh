set -x
mkdir -p $OUT
source .devscripts/fa4env.sh
timeout 60 python -m pytest -q -m gpu -n 0 tests/ops/test_row_gather.py 2>&1 | tail -3 | tee $OUT/gpu_tests_row_gather_s48.log
timeout 400 python benchmarks/training.py --backends gluon flex --output $OUT/training_fa4_s48.json 2>&1 | tail -20 | tee $OUT/training_fa4_s48.log
