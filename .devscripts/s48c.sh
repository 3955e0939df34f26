set -x
mkdir -p $OUT /tmp/fa4w
cp .whl/pab /tmp/fa4parts/ && cat /tmp/fa4parts/paa /tmp/fa4parts/pab | tar -xf - -C /tmp/fa4w
pip install -q --no-deps --target /tmp/fa4 /tmp/fa4w/*.whl 2>&1 | tail -2
source .devscripts/fa4env.sh
python -c "from sparse_attn.backends import flash4; print('flash4 installed():', flash4.installed())"
timeout 520 python benchmarks/kernel_grid.py --lengths 32768 131072 --dims 128 --extra-dims --densities 0.05 0.1 0.2 1.0 --kernels both --also auto --out $OUT/kernels_fa4_d128_s48.json 2>&1 | tail -12 | tee $OUT/kernels_fa4_d128_s48.log
