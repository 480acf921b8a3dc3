"""virt-vmstate: carry the state of a VM's D-Bus helper processes across libvirt migrations."""

__version__ = "0.3.0"
