#!/bin/sh
# etcd + kube-apiserver in one container. At first start, a CA, the serving certificate, the
# service-account keys and an admin client certificate are made under $KUBE_DATA/pki, and the
# kubeconfigs are written to $KUBE_OUTPUT:
#   kubeconfig.yaml          https://127.0.0.1:6443   (inside this container: the healthcheck)
#   kubeconfig-compose.yaml  https://kube-api:6443    (the other containers)
#   ca.crt                   the CA (the healthcheck, and clients on the host)
# The lease endpoint reconciler keeps Service default/kubernetes pointing at this container.
set -eu
KUBE_DATA=${KUBE_DATA:-/var/lib/kube}
KUBE_OUTPUT=${KUBE_OUTPUT:-/output}
KUBE_HOSTNAME=${KUBE_HOSTNAME:-kube-api}
pki=$KUBE_DATA/pki
address=$(hostname -i | awk '{print $1}')

issue() { # name subject extensions...
    name=$1 subject=$2
    shift 2
    printf '%s\n' "$@" >"$pki/$name.ext"
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key"
    openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 3650 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
}

kubeconfig() { # path server
    cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: apilane-compose
    cluster:
      server: $2
      certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
  - name: admin
    user:
      client-certificate-data: $(base64 -w0 "$pki/admin.crt")
      client-key-data: $(base64 -w0 "$pki/admin.key")
contexts:
  - name: apilane-compose
    context: {cluster: apilane-compose, user: admin}
current-context: apilane-compose
KUBECONFIG
    chmod 0644 "$1"
}

if [ ! -s "$pki/admin.crt" ]; then
    rm -rf "$pki" && mkdir -p "$pki"
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key"
    openssl req -x509 -new -key "$pki/ca.key" -subj /CN=apilane-compose-ca -days 3650 \
        -out "$pki/ca.crt"
    issue apiserver /CN=kube-apiserver \
        "subjectAltName=DNS:$KUBE_HOSTNAME,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1" \
        "extendedKeyUsage=serverAuth" "keyUsage=digitalSignature,keyEncipherment"
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    # Last: its presence marks a complete PKI.
    issue admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth"
fi
mkdir -p "$KUBE_OUTPUT"
cp "$pki/ca.crt" "$KUBE_OUTPUT/ca.crt"
kubeconfig "$KUBE_OUTPUT/kubeconfig.yaml" https://127.0.0.1:6443
kubeconfig "$KUBE_OUTPUT/kubeconfig-compose.yaml" "https://$KUBE_HOSTNAME:6443"

etcd --name kube-api --data-dir "$KUBE_DATA/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster kube-api=http://127.0.0.1:2380 --log-level warn &
etcd_pid=$!
# Either process ending ends the container (and with it the other).
trap 'kill -TERM "$etcd_pid" "$apiserver_pid" 2>/dev/null' TERM INT
kube-apiserver \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$address" --secure-port=6443 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --authorization-mode=Node,RBAC --endpoint-reconciler-type=lease \
    --allow-privileged=true --profiling=false --v=1 &
apiserver_pid=$!
status=0
while kill -0 "$etcd_pid" 2>/dev/null && kill -0 "$apiserver_pid" 2>/dev/null; do
    sleep 1
done
kill -TERM "$etcd_pid" "$apiserver_pid" 2>/dev/null || status=$?
wait "$apiserver_pid" || status=$?
wait "$etcd_pid" || true
exit "$status"
