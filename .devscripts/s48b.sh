mkdir -p /tmp/fa4parts && cp .whl/paa /tmp/fa4parts/ && ls -la /tmp/fa4parts && nvidia-smi --query-gpu=name --format=csv
