// llama.cpp's logits on a GGUF, for flashmoe's agreement fixtures (scripts/gguf_fixtures.sh).
//
//   gguf_logits MODEL.gguf OUT.json "1,2,3" "4,5,6" ... [-- "text to tokenize" ...]
//
// Each token sequence is decoded by one llama_decode in a fresh context (CPU, one thread, no
// flash attention), with the logits of every position. Each text after `--` is tokenized
// (parse_special, no BOS) so the tokenizer built from the GGUF's metadata can be checked too.
// Writes {"logits":[[[...]...]...],"sequences":[[...]...],"texts":[...],"tokens":[[...]...]}.
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int parse_ids(const char *s, llama_token *out, int max) {
    int n = 0;
    while (*s && n < max) {
        char *end;
        out[n++] = (llama_token) strtol(s, &end, 10);
        if (end == s) return -1;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char) *s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT.json IDS... [-- TEXT...]\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    FILE *f = fopen(argv[2], "w");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", argv[2]);
        return 1;
    }
    int texts = argc;
    for (int a = 3; a < argc; a++)
        if (strcmp(argv[a], "--") == 0) texts = a;
    enum { MAX = 512 };
    llama_token ids[MAX];
    fputs("{\"sequences\":[", f);
    for (int a = 3; a < texts; a++) {
        int n = parse_ids(argv[a], ids, MAX);
        if (n <= 0) {
            fprintf(stderr, "bad token list %s\n", argv[a]);
            return 1;
        }
        fputs(a > 3 ? ",[" : "[", f);
        for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", ids[i]);
        fputc(']', f);
    }
    fputs("],\"logits\":[", f);
    for (int a = 3; a < texts; a++) {
        int n = parse_ids(argv[a], ids, MAX);
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = cp.n_batch = cp.n_ubatch = MAX;
        cp.n_threads = cp.n_threads_batch = 1;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.no_perf = true;
        struct llama_context *ctx = llama_init_from_model(model, cp);
        if (!ctx) {
            fprintf(stderr, "cannot create a context\n");
            return 1;
        }
        struct llama_batch b = llama_batch_init(n, 0, 1);
        for (int i = 0; i < n; i++) {
            b.token[i] = ids[i];
            b.pos[i] = i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = 1;
        }
        b.n_tokens = n;
        if (llama_decode(ctx, b) != 0) {
            fprintf(stderr, "llama_decode failed\n");
            return 1;
        }
        fputs(a > 3 ? ",[" : "[", f);
        for (int i = 0; i < n; i++) {
            const float *l = llama_get_logits_ith(ctx, i);
            fputs(i ? ",[" : "[", f);
            for (int v = 0; v < n_vocab; v++) fprintf(f, v ? ",%.9g" : "%.9g", l[v]);
            fputc(']', f);
        }
        fputc(']', f);
        llama_batch_free(b);
        llama_free(ctx);
    }
    fputs("],\"texts\":[", f);
    for (int a = texts + 1; a < argc; a++) {
        if (a > texts + 1) fputc(',', f);
        json_string(f, argv[a]);
    }
    fputs("],\"tokens\":[", f);
    for (int a = texts + 1; a < argc; a++) {
        int n = llama_tokenize(vocab, argv[a], (int) strlen(argv[a]), ids, MAX, false, true);
        if (n < 0) {
            fprintf(stderr, "text too long: %s\n", argv[a]);
            return 1;
        }
        fputs(a > texts + 1 ? ",[" : "[", f);
        for (int i = 0; i < n; i++) fprintf(f, i ? ",%d" : "%d", ids[i]);
        fputc(']', f);
    }
    fputs("]}\n", f);
    fclose(f);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
