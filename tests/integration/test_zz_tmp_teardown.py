import os, time
def test_fail(s3_server):
    open("/tmp/weedpid", "w").write(str(s3_server.pid))
    if os.environ.get("HANG"): time.sleep(300)
    assert False
