import subprocess, sys, tempfile, time
from bench import fixtures, load, servers
fx = fixtures.build(fixtures.FULL)
wd = tempfile.mkdtemp(prefix="perf-fresh-")
try:
    serving = servers.wait_peernix(servers.spawn_peernix("serve", fx.store, wd, secret_key_file=fx.secret_key_file))
    times = []
    for i in range(int(sys.argv[1])):
        proxy = servers.spawn_peernix("fresh", fx.empty_store, wd, peers=[servers.base_url(serving)], trusted_public_keys=[fx.public_key])
        servers.wait_peernix(proxy)
        spy = None
        if i == 0 and len(sys.argv) > 2:
            spy = subprocess.Popen(["/work/venv/bin/py-spy", "record", "-p", str(proxy.process.pid), "-r", "500", "-f", "raw", "-o", sys.argv[2]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        times.append(load.nix_realise(proxy.cache_url, fx.public_key, [fx.chain_top]))
        if spy: spy.send_signal(2); spy.wait()
        proxy.stop()
    nginx = servers.start_nginx(fx, wd)
    ref = [load.nix_realise(nginx.cache_url, fx.public_key, [fx.chain_top]) for _ in range(3)]
    b = [load.nix_realise(serving.cache_url, fx.public_key, [fx.chain_top]) for _ in range(3)]
    print("fresh", [round(t,3) for t in times], "served", [round(t,3) for t in b], "nginx", [round(t,3) for t in ref])
finally:
    servers.stop_all()
