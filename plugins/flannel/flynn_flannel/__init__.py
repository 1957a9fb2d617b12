"""flannel: the overlay network. Each host leases a subnet and joins a vxlan mesh of them."""
