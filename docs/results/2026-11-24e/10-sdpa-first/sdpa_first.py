import time, torch, torch.nn.functional as F
dev = "cuda"
def run(label):
    for (b, q, k) in [(2, 300, 320), (3, 512, 512), (2, 257, 272), (5, 400, 400), (4, 512, 528), (2, 300, 320)]:
        qq = torch.randn(b, 32, q, 128, device=dev, dtype=torch.bfloat16)
        kk = torch.randn(b, 8, k, 128, device=dev, dtype=torch.bfloat16)
        m = torch.ones(b, 1, q, k, dtype=torch.bool, device=dev).tril(k - q)
        torch.cuda.synchronize(); t = time.perf_counter()
        F.scaled_dot_product_attention(qq, kk, kk, attn_mask=m, enable_gqa=True)
        torch.cuda.synchronize(); first = time.perf_counter() - t
        t = time.perf_counter()
        F.scaled_dot_product_attention(qq, kk, kk, attn_mask=m, enable_gqa=True)
        torch.cuda.synchronize(); second = time.perf_counter() - t
        print(label, b, q, k, f"first {first*1e3:.1f} ms, again {second*1e3:.2f} ms", flush=True)
run("default")
torch.backends.cuda.enable_cudnn_sdp(False)
run("no-cudnn")
