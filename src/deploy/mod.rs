//! Deployment next to a virtualisation manager: the libvirt hook that starts the sidecar
//! for incoming migrations, its installer, and the systemd unit it can use.

pub mod libvirt;
