mkdir -p /tmp/fa4parts && cp .whl/yaa /tmp/fa4parts/ && ls -la /tmp/fa4parts && python -V
