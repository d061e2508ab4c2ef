#!/usr/bin/env bash
# The main job: builds Porin and runs it on its embedded default.
# Today (the kernel datapath and the lab are not built yet) that is `porin policy test` over every
# example policy in config/examples, the same tests a team runs in its CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_main

cargo build --release --locked -p porin
bin=target/release/porin

echo "== porin policy validate config/examples"
find config/examples -name '*.yaml' ! -name '*.test.yaml' -print0 | sort -z | xargs -0 "$bin" policy validate
echo
echo "== porin policy test config/examples"
find config/examples -name '*.test.yaml' -print0 | sort -z | xargs -0 "$bin" policy test
echo
echo "== porin policy trace: why is the exhaust port refused?"
"$bin" policy trace config/examples/starwars/l3-l4-l7.test.yaml \
    --from tiefighter --to deathstar --port 80 --http-method PUT --http-path /v1/exhaust-port
