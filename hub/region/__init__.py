"""The region: coordination (leases, approvals, tasks), leadership among replicas, replicas."""
