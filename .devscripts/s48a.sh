set -x
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
mkdir -p $OUT
SPARSE_ATTN_TEST_ONE_CONFIG=1 timeout 260 python -m pytest -q -m gpu -n 0 tests/backends/test_gluon.py -k "pingpong" -W error::UserWarning 2>&1 | tail -15 | tee $OUT/gpu_tests_pingpong_s48.log
timeout 300 python benchmarks/launch_order.py --cases causal spatial --choices waves waves_pingpong waves_no_pingpong --out $OUT/launch_order_pingpong_s48.json 2>&1 | tail -40 | tee $OUT/launch_order_pingpong_s48.log
