"""Discovery: what listens in each network namespace in view, who owns it, and the
namespace's interface addresses. Backends (netlink sock_diag, psutil) are chosen once."""
