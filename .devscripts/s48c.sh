set -x
mkdir -p $OUT /tmp/fa4x
cp .whl/yab /tmp/fa4parts/ && cat /tmp/fa4parts/yaa /tmp/fa4parts/yab | xz -d | tar -xf - -C /tmp/fa4x && rm -rf /tmp/fa4 && mv /tmp/fa4x/site /tmp/fa4
source .devscripts/fa4env.sh
python -X faulthandler -c "import cutlass.cute; from flash_attn.cute import flash_attn_func; from sparse_attn.backends import flash4; print('flash4 installed():', flash4.installed())" 2>&1 | tail -5
timeout 480 python benchmarks/kernel_grid.py --lengths 32768 131072 --dims 128 --extra-dims --densities 0.05 0.1 0.2 1.0 --kernels both --also auto --out $OUT/kernels_fa4_d128_s48.json > $OUT/kernels_fa4_d128_s48.log 2>&1
tail -14 $OUT/kernels_fa4_d128_s48.log
