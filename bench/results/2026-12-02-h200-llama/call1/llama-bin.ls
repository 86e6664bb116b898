total 84440
drwxr-xr-x  2 root root     4096 Dec  2 19:19 .
drwxr-xr-x 10 root root     4096 Dec  2 19:19 ..
lrwxrwxrwx  1 root root       17 Dec  2 19:16 libggml-base.so -> libggml-base.so.0
lrwxrwxrwx  1 root root       22 Dec  2 19:16 libggml-base.so.0 -> libggml-base.so.0.25.3
-rwxr-xr-x  1 root root  1249528 Dec  2 19:16 libggml-base.so.0.25.3
lrwxrwxrwx  1 root root       16 Dec  2 19:19 libggml-cpu.so -> libggml-cpu.so.0
lrwxrwxrwx  1 root root       21 Dec  2 19:19 libggml-cpu.so.0 -> libggml-cpu.so.0.25.3
-rwxr-xr-x  1 root root  1827512 Dec  2 19:19 libggml-cpu.so.0.25.3
lrwxrwxrwx  1 root root       17 Dec  2 19:19 libggml-cuda.so -> libggml-cuda.so.0
lrwxrwxrwx  1 root root       22 Dec  2 19:19 libggml-cuda.so.0 -> libggml-cuda.so.0.25.3
-rwxr-xr-x  1 root root 70049096 Dec  2 19:19 libggml-cuda.so.0.25.3
lrwxrwxrwx  1 root root       12 Dec  2 19:19 libggml.so -> libggml.so.0
lrwxrwxrwx  1 root root       17 Dec  2 19:19 libggml.so.0 -> libggml.so.0.25.3
-rwxr-xr-x  1 root root   275504 Dec  2 19:19 libggml.so.0.25.3
-rwxr-xr-x  1 root root   484664 Dec  2 19:19 libllama-bench-impl.so
lrwxrwxrwx  1 root root       20 Dec  2 19:19 libllama-common.so -> libllama-common.so.0
lrwxrwxrwx  1 root root       24 Dec  2 19:19 libllama-common.so.0 -> libllama-common.so.0.5.0
-rwxr-xr-x  1 root root  6086720 Dec  2 19:19 libllama-common.so.0.5.0
lrwxrwxrwx  1 root root       13 Dec  2 19:19 libllama.so -> libllama.so.0
lrwxrwxrwx  1 root root       17 Dec  2 19:19 libllama.so.0 -> libllama.so.0.5.0
-rwxr-xr-x  1 root root  4989568 Dec  2 19:19 libllama.so.0.5.0
-rwxr-xr-x  1 root root  1474288 Dec  2 19:19 llama-bench
