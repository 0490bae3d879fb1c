#!/usr/bin/env bash
# A throwaway CA and a certificate for localhost (or $1) in nginx/tls/, for
# trying deploy/compose.yaml. Clients trust nginx/tls/ca.pem. Production puts
# a real chain (fullchain.pem, leaf first) and its key (privkey.pem) there.
set -euo pipefail
name=${1:-localhost}
dir="$(cd "$(dirname "$0")" && pwd)/tls"
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=Herald test CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=$name" -keyout privkey.pem -out leaf.csr 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$name" > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
  -extfile leaf.ext -out leaf.pem 2>/dev/null
cat leaf.pem ca.pem > fullchain.pem
rm -f leaf.csr leaf.ext leaf.pem ca.srl ca.key
chmod 0644 fullchain.pem ca.pem
chmod 0600 privkey.pem
echo "wrote $dir/fullchain.pem and privkey.pem; clients trust $dir/ca.pem"
