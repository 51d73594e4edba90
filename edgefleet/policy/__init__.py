"""The policy language: expressions, the policy document and its validator, firmware profiles,
and the policy-against-profile check both sides run."""
