# source me: FA4 from /tmp/fa4 (installed by s48c.sh) and the repository's sources
export PYTHONPATH=$PWD/src:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
