#!/bin/sh
# One Pacemaker/Corosync cluster node for vmm/tests/cluster.rs, inside the network
# namespace the test created, in a mount namespace of its own: the node's state
# (/var/lib/pacemaker, /var/lib/corosync, /var/log/pacemaker, /dev/shm) lives under DIR,
# and /usr/lib/ocf/resource.d is a copy with ocf/colo installed as ocf:colo:colo. Nothing
# of the host's own cluster files is touched.
#
# Usage (as root, under `ip netns exec NS unshare -m --propagation private`):
#   node.sh DIR AGENT NODE_NAME
# Runs corosync and pacemakerd in the foreground until they end.
set -eu
dir=$1
agent=$2
name=$3

mkdir -p "$dir/pcmk/cib" "$dir/pcmk/pengine" "$dir/pcmk/blackbox" "$dir/pcmk/cores" \
	"$dir/corosync" "$dir/pcmklog" "$dir/ra" "$dir/shm" "$dir/log"
chown -R hacluster:haclient "$dir/pcmk" "$dir/pcmklog"
cp -a /usr/lib/ocf/resource.d/. "$dir/ra/"
mkdir -p "$dir/ra/colo"
install -m 755 "$agent" "$dir/ra/colo/colo"

# Short elections: the cluster is up in seconds, not the default 20 s.
cat >"$dir/pcmk/cib/cib.xml" <<X
<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="opt-stonith" name="stonith-enabled" value="false"/>
        <nvpair id="opt-quorum" name="no-quorum-policy" value="ignore"/>
        <nvpair id="opt-recheck" name="cluster-recheck-interval" value="1min"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
X
chown hacluster:haclient "$dir/pcmk/cib/cib.xml"
chmod 600 "$dir/pcmk/cib/cib.xml"

cat >"$dir/corosync.conf" <<C
totem {
  version: 2
  cluster_name: colotest
  crypto_cipher: none
  crypto_hash: none
  token: 1000
}
logging {
  to_stderr: yes
  to_logfile: no
  to_syslog: no
}
quorum {
  provider: corosync_votequorum
}
nodelist {
  node {
    name: $name
    nodeid: 1
    ring0_addr: 127.0.0.1
  }
}
C

mount --make-rprivate /
mount --bind "$dir/pcmk" /var/lib/pacemaker
mount --bind "$dir/corosync" /var/lib/corosync
mount --bind "$dir/pcmklog" /var/log/pacemaker
mount --bind "$dir/ra" /usr/lib/ocf/resource.d
mount -t tmpfs -o mode=1777 tmpfs /dev/shm

corosync -f -c "$dir/corosync.conf" >"$dir/log/corosync.log" 2>&1 &
sleep 1
export PCMK_logfile="$dir/log/pacemaker.log"
export PCMK_node_start_state=online
exec pacemakerd -f >"$dir/log/pacemakerd.log" 2>&1
