//! QMP client used to configure and observe QEMU.
