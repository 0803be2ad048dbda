"""The isolated network's firewall rules, as text: what they let through and what they drop."""

from __future__ import annotations

from mlserve.firewall import FORWARD_CHAIN, HOST_CHAIN, nameservers, rules


def test_resolvers_are_the_ipv4_non_loopback_nameservers():
    text = "# comment\nnameserver 10.255.255.53\nnameserver 127.0.0.53\nnameserver ::1\n nameserver 8.8.8.8\nsearch x\n"
    assert nameservers(text) == ["10.255.255.53", "8.8.8.8"]
    assert nameservers("nameserver not-an-address\n") == []


def test_rules_let_dns_through_and_drop_private_ranges_and_the_host():
    chains = rules(["10.255.255.53"])
    forward = [" ".join(rule) for rule in chains[FORWARD_CHAIN]]
    assert forward[:3] == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-d 10.255.255.53/32 -p udp --dport 53 -j RETURN",
        "-d 10.255.255.53/32 -p tcp --dport 53 -j RETURN",
    ]
    dropped = {rule.split()[1] for rule in forward[3:]}
    assert all(rule.endswith("-j DROP") for rule in forward[3:])
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10"} <= dropped
    # New connections to the host itself end in DROP; answers to its own connections pass.
    assert [" ".join(rule) for rule in chains[HOST_CHAIN]] == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", "-j DROP"]
