set -x
mkdir -p $OUT
ls /tmp/fa4parts /tmp/fa4 | head -3
python -c "
import zipfile; zipfile.ZipFile('.whl/nvidia_cutlass_dsl_libs_core-4.8.1-py3-none-any.whl').extractall('/tmp/fa4')"
source .devscripts/fa4env.sh
python -c "import cutlass.cute; from flash_attn.cute import flash_attn_func; print('ok')" 2>&1 | tail -3
timeout 500 python benchmarks/kernel_grid.py --lengths 32768 131072 --dims 128 --extra-dims --densities 0.05 0.1 0.2 1.0 --kernels both --also auto --out $OUT/kernels_fa4_d128_s48.json 2>&1 | tail -12 | tee $OUT/kernels_fa4_d128_s48.log
