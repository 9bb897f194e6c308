"""English texts of ``attnkit tour``: one ``str.format`` template per key.

The numbers are filled in at run time. Written for English readers, not translated line
by line from :mod:`attnkit.tour.text_zh`, which has the same keys. Paragraphs are wrapped
by hand to fit a terminal. Its non-ASCII characters, like those of the Chinese texts,
must exist in the shipped font subset (``attnkit/fonts/``).
"""

EN = {
    "title": "attnkit tour: attention, computed for real",
    "header": "Every number below is computed as you watch, with attnkit's own functions\n"
              "(seed {seed}). Pictures go to {out}/",
    "no_cjk_font": "attnkit: no CJK font found; Chinese labels in the pictures may show as "
                   "boxes (install fonts-noto-cjk).",
    "picture": "picture: {path}",
    "elapsed": "({s:.1f} s)",
    "done": "\nDone in {s:.1f} s. {n} pictures in {out}/:",
    "tokens": ["cat", "on", "tree"],

    "sec_why": "Why attention",
    "sec_seq2seq": "Where attention came from: RNN encoder-decoders, trained live",
    "sec_qkv": "Q, K and V, from a three-word sentence",
    "sec_cross": "Self-attention and cross-attention",
    "sec_heads": "Multi-head, multi-query and grouped-query attention",
    "sec_padding": "Padding masks",
    "sec_positions": "Positions inside attention",
    "sec_long": "Long sequences: sparse patterns and memory",

    # 1 ------------------------------------------------------------------------------
    "why_intro":
        "A classic encoder-decoder (an RNN seq2seq model) squeezes the whole input into one\n"
        "fixed-size vector, and the decoder sees nothing else: the longer the input, the less\n"
        "of any single token survives. Attention lets every output position look at every\n"
        "input position directly and take what it needs.\n"
        "\n"
        "Experiment with n random token vectors (d = {d}, averaged over {trials} random\n"
        "sentences). The fixed-size summary is their mean; an attention query that asks for\n"
        "token 1 (q = x_1) reads all n of them. How close to token 1 is what each delivers\n"
        "(cosine)? And how much does token 1 still move position n: the norm of the\n"
        "Jacobian d out_n / d x_1 for a recurrent network h_t = tanh(W h_(t-1) + U x_t)\n"
        "and for one attention layer.",
    "why_headers": ["n", "summary cos", "attention cos", "weight on x_1",
                    "RNN |dh_n/dx_1|", "attention |dy_n/dx_1|"],
    "why_summary_steady":
        "The mean keeps less of token 1 at every length: its cosine falls from {s0:.3f}\n"
        "(n = {n0}) to {s1:.3f} (n = {n1}), {rel} ({e0:.3f} to {e1:.3f}).",
    "why_near": "near 1/sqrt(n)",
    "why_far": "though not close to 1/sqrt(n)",
    "why_summary_noisy":
        "The mean keeps less of token 1 as n grows, {s0:.3f} at n = {n0} against {s1:.3f}\n"
        "at n = {n1} (1/sqrt(n): {e0:.3f} to {e1:.3f}), though not at every step: with\n"
        "{trials} random sentences per length the cosine is noisy (n = {na}: {sa:.3f},\n"
        "n = {nb}: {sb:.3f}).",
    "why_summary_flat":
        "Here the mean's cosine with token 1 does not fall ({s0:.3f} at n = {n0}, {s1:.3f}\n"
        "at n = {n1}); 1/sqrt(n) would go from {e0:.3f} to {e1:.3f}.",
    "why_attn_keeps":
        "Attention still finds token 1: its output keeps a cosine of at least {low:.3f}.",
    "why_rnn":
        "In the RNN, |dh_n/dx_1| falls {f:.1e}-fold from n = {n0} to n = {n1}: the signal\n"
        "from token 1 crosses n - 1 steps, each multiplying it by W and by tanh' < 1, so\n"
        "it fades geometrically.",
    "why_attn_grad":
        "Attention's |dy_n/dx_1| falls too, {f:.0f}-fold, but for another reason:\n"
        "position n's query spreads its softmax over n keys, 1/n of the weight per key on\n"
        "average, and 1/n falls {nf:.0f}-fold from n = {n0} to n = {n1}. That fall is\n"
        "polynomial, not geometric: every token stays one step from every other, so\n"
        "long-range dependencies need no recurrence, and all positions run in parallel.{steady}",
    "why_not_every_step": "\n(Its fall is not steady: each length draws new random sentences.)",
    "fig_why_summary": "fixed-size summary (mean)",
    "fig_why_attn": "attention, q = x₁",
    "fig_why_n": "sequence length n",
    "fig_why_cos": "cosine with token 1",
    "fig_why_title1": "What reaches the decoder about token 1",
    "fig_why_attn_layer": "one attention layer",
    "fig_why_grad": "‖∂ out_n / ∂ x₁‖",
    "fig_why_title2": "Influence of token 1 on position n",

    # 1b -----------------------------------------------------------------------------
    "s2s_intro":
        "Attention was invented for RNN encoder-decoders that translate. Three of them are\n"
        "trained now, on this machine, to reverse a sequence of letters ({v} different\n"
        "letters, lengths {lo} to {hi}): a bidirectional GRU encoder, a GRU decoder of\n"
        "{hidden} numbers, the same seed, batches and budget ({steps} Adam steps of {batch}\n"
        "sentences) for each:\n"
        "  no attention  the decoder gets one vector, the encoder's final state (Sutskever\n"
        "                et al. 2014, Cho et al. 2014), and must carry the whole sentence in it;\n"
        "  additive      every step scores every encoder state, v^T tanh(W_q s + W_k h_j)\n"
        "                (Bahdanau et al. 2015: attnkit.layers.AdditiveAttention);\n"
        "  general       the score is s^T W h_j (Luong et al. 2015: LuongAttention).\n"
        "Exact match (every output letter right) on up to 200 sentences per length range\n"
        "that training never drew (lengths 3-4 have only a few thousand):",
    "s2s_variant": "decoder",
    "s2s_bucket": "len {b}",
    "s2s_loss": "final loss",
    "s2s_time": "trained in",
    "s2s_label_None": "no attention",
    "s2s_label_additive": "additive",
    "s2s_label_general": "general",
    "s2s_falls":
        "Without attention accuracy falls from {a0:.0%} on {b0} letters to {a1:.0%} on {b1}:\n"
        "one vector of the decoder's width cannot hold a long sentence.",
    "s2s_not_falls":
        "Without attention accuracy goes from {a0:.0%} on {b0} letters to {a1:.0%} on {b1}:\n"
        "with this seed the bottleneck does not show as a fall to half or less.",
    "s2s_untrained":
        "Without attention accuracy is {a0:.0%} on {b0} letters and {a1:.0%} on {b1}: it has\n"
        "learned too little, even for short sentences, to show how it fares on long ones.",
    "s2s_over": "over",
    "s2s_below": "below",
    "s2s_holds":
        "With {name} attention it stays at {low:.0%} or more at every length ({last:.0%} on\n"
        "{b1} letters, {gain:.0f} points {side} no attention).",
    "s2s_weak":
        "With {name} attention the worst length reaches only {low:.0%} ({last:.0%} on {b1}\n"
        "letters, {gain:.0f} points {side} no attention).",
    "s2s_result": "{plain}\n{attended}",
    "s2s_alignment":
        "The picture's right panel is the additive model's attention while it reverses one\n"
        "fresh sentence of {n} letters: on average an output step puts {share:.0%} of its\n"
        "weight on the source letter it should write (the mirrored one), where spreading\n"
        "evenly would give {uniform:.0%}.\n"
        "Nobody told it where to look: the alignment is learned from the loss alone.",
    "s2s_outro":
        "Attention removed the one-vector bottleneck, and the Transformer (2017) then removed\n"
        "the recurrence too: the rest of this tour is that attention, scaled dot-product.",
    "fig_s2s_length": "source length (letters)",
    "fig_s2s_accuracy": "exact-match accuracy",
    "fig_s2s_title1": "Reversing sequences, {steps} training steps each",
    "fig_s2s_title2": "Additive attention while reversing",
    "fig_s2s_source": "source letter",
    "fig_s2s_output": "output step",

    # 2 ------------------------------------------------------------------------------
    "qkv_embed":
        "Each token gets an embedding (d_model = {d}) plus a sinusoidal position encoding,\n"
        "so the same word at another position gives a different vector.",
    "qkv_name_E": "E: token embeddings",
    "qkv_name_P": "P: position encodings (attnkit.positional.sinusoidal_encoding)",
    "qkv_name_X": "X = E + P",
    "qkv_proj":
        "Three learned matrices (random here, from the seed) project X into queries, keys\n"
        "and values of d_k = {dk} dimensions: Q asks, K advertises, V is what is handed over.",
    "qkv_scores": "Scores: every query against every key, Q K^T (rows: queries, columns: keys):",
    "qkv_scaled": "Divided by sqrt(d_k) = {s:.2f}:",
    "qkv_weights":
        "Softmax over each row gives the attention weights; every row sums to 1.\n"
        "These come from attnkit.scaled_dot_product_attention(Q, K, V, return_weights=True):",
    "qkv_check": "softmax(scaled scores) above vs the library's weights: max |diff| = {e:.1e}",
    "qkv_out": "The output of each token is the weights times the values, a weighted sum of V:",
    "qkv_out_check": "weights @ V vs the library's output: max |diff| = {e:.1e}",
    "qkv_analogy":
        "An everyday picture: a library. You walk in with a query, a short summary of what\n"
        "you are looking for. Every book has a catalogue card (its key) and a content (its\n"
        "value). You compare your summary with each card (the dot product), split your\n"
        "reading time among the books in proportion to how well they match, shares that add\n"
        "up to 1 (the softmax), and come away with a blend of their contents (the weighted\n"
        "sum of values). Unlike a real catalogue search nothing is all-or-nothing: every\n"
        "book contributes a little.",
    "fig_key": "key",
    "fig_query": "query",
    "fig_score": "score",
    "fig_weight": "attention weight",
    "fig_weights_title": "softmax → weights",
    "fig_qkv_suptitle": "Scores and weights for \"cat on tree\"",

    "scale_intro":
        "Why divide by sqrt(d_k)? If the entries of q and k have mean 0 and variance 1, q.k\n"
        "is a sum of d_k such products, so its variance is d_k. Measured on {n} random pairs,\n"
        "and the softmax over {keys} keys (entropy ln {keys} = {hmax:.2f} means uniform, 0 means\n"
        "all weight on one key):",
    "scale_headers": ["d_k", "Var(q.k)", "Var(q.k/sqrt(d_k))", "entropy unscaled",
                      "entropy scaled", "max weight unscaled", "max weight scaled"],
    "scale_outro":
        "Unscaled, the variance of q.k grows from {v0:.1f} (d_k = {d0}) to {v1:.1f} (d_k = {d1}),\n"
        "and the softmax saturates: its entropy falls from {h0:.2f} to {h1:.2f} and the largest\n"
        "weight reaches {m1:.2f}, close to a one-hot choice, where the gradient vanishes (the\n"
        "softmax is flat away from the winner). Scaled by 1/sqrt(d_k), the entropy stays\n"
        "between {lo:.2f} and {hi:.2f} at every width.",
    "scale_outro_flat":
        "Unscaled, the variance of q.k grows from {v0:.1f} (d_k = {d0}) to {v1:.1f} (d_k = {d1});\n"
        "in this run the entropy did not fall ({h0:.2f} to {h1:.2f}). Scaled by 1/sqrt(d_k),\n"
        "it stays between {lo:.2f} and {hi:.2f} at every width.",
    "fig_variance": "variance",
    "fig_scale_title1": "Variance of q·k grows with d_k",
    "fig_unscaled": "unscaled: softmax(q·k)",
    "fig_scaled": "scaled: softmax(q·k / √d_k)",
    "fig_uniform": "uniform over {n} keys",
    "fig_entropy": "entropy of the weights (nats)",
    "fig_scale_title2": "Softmax over {n} keys: saturation without scaling",

    # 3 ------------------------------------------------------------------------------
    "cross_intro":
        "Same computation, different sources: in self-attention Q, K and V come from one\n"
        "sequence; in cross-attention the queries come from one sequence (the decoder) and\n"
        "the keys and values from another (the encoder's output). A tiny translation model\n"
        "(embeddings built so that words with the same meaning are close in both languages,\n"
        "as a trained model would have learned):\n"
        "  encoder reads   {src}\n"
        "  decoder writes  {tgt}",
    "cross_enc": "Encoder self-attention: Q, K and V from the {S} encoder tokens:",
    "cross_dec": "Decoder self-attention, causal (no peeking at later words): {L} x {L}:",
    "cross_cross":
        "Cross-attention: Q from the decoder ({L} tokens), K and V from the encoder\n"
        "({S} tokens), so the weights are {L} x {S}:",
    "cross_best": "Each decoder word and the source word it attends to most:",
    "cross_same":
        "All three are the same attnkit.MultiHeadAttention class; only the inputs differ.\n"
        "The cross-attention layer's output equals scaled_dot_product_attention on the\n"
        "projected decoder queries and encoder keys/values: max |diff| = {e:.1e}",
    "cross_all_found":
        "All {n} decoder words with a counterpart put most of their weight on it.",
    "cross_some_found":
        "{k} of the {n} decoder words with a counterpart put most of their weight on it;\n"
        "\"{word}\" puts most on \"{got}\" ({w:.2f}).",
    "cross_zai_split": "在 splits its weight between \"is\" ({a:.2f}) and \"on\" ({b:.2f}).",
    "cross_zai_one": "在 means \"is on\", yet does not split its weight: {a:.2f} on \"is\", {b:.2f} on \"on\".",
    "cross_the_source":
        "No decoder word puts more than {m:.2f} on \"the\", which has no counterpart.",
    "cross_is_on": "\"is\" puts {a:.2f} and \"on\" {b:.2f} on 在, which means both.",
    "cross_the_spread":
        "\"the\" has no counterpart: its largest weight is {m:.2f}, below the {r:.2f} that\n"
        "every word with a counterpart gives its own.",
    "cross_the_sharp":
        "\"the\" has no counterpart, yet one of its weights reaches {m:.2f} (words with a\n"
        "counterpart give theirs at least {r:.2f}).",
    "cross_outro": "Cross-attention is a soft, learned alignment between the two sentences.",
    "fig_enc_self": "encoder self-attention",
    "fig_dec_self": "decoder self-attention (causal)",
    "fig_cross": "cross-attention",
    "fig_key_enc": "key (encoder)",
    "fig_query_dec": "query (decoder)",
    "fig_cross_suptitle": "Self-attention vs cross-attention in a tiny encoder-decoder",

    # 4 ------------------------------------------------------------------------------
    "heads_intro":
        "Multi-head attention splits d_model = {E} into {H} heads of {d} dimensions. Each head\n"
        "has its own slice of the projections, compares tokens in its own subspace and can\n"
        "attend differently. The heads of one attnkit.MultiHeadAttention({E}, {H}) on our\n"
        "sentence (need_weights=True):",
    "head": "head {h}",
    "heads_gqa":
        "Keys and values need not have one head per query head. MHA: every query head has\n"
        "its own K/V head. GQA (grouped-query): a group of query heads shares one K/V head.\n"
        "MQA (multi-query): all query heads share a single K/V head. attnkit shares by\n"
        "indexing, without copying K/V: {hq} query heads on {hkv} K/V heads give the same\n"
        "result as repeating each K/V head {g} times: max |diff| = {e:.1e}.",
    "heads_real":
        "Why it matters: at inference the KV cache keeps K and V of every past token in\n"
        "every layer, and its size limits batch size and context length. Sizes from the\n"
        "models' public configs (hidden 4096, 32 layers, 32 query heads of 128 dimensions;\n"
        "Llama-2-7B has 32 K/V heads, Llama-3-8B has 8). Parameters counted on an\n"
        "attnkit.MultiHeadAttention built on the meta device (no memory used), cache bytes\n"
        "from an attnkit.KVCache holding one fp16 token, times the layers; {ctx} tokens is\n"
        "Llama-3-8B's context:",
    "heads_headers": ["model", "Q heads", "K/V heads", "head dim", "attn params/layer",
                      "all layers", "KV cache/token", "KV cache, 8192 tok"],
    "mqa_name": "MQA, same sizes",
    "mla_name": "MLA, same sizes",
    "latent_kv": "latent {n}",
    "heads_outro":
        "GQA with 8 K/V heads makes the cache {r_gqa:.0f}x smaller than MHA; MQA {r_mqa:.0f}x,\n"
        "at some cost in quality. The GQA paper (Ainslie et al., 2023) found GQA close to\n"
        "MHA in quality and close to MQA in speed, which is why Llama 3, Mistral and Qwen2\n"
        "use it.",
    "heads_mla":
        "MLA (multi-head latent attention, DeepSeek-V2 and V3) caches neither K nor V: each\n"
        "token leaves one latent of {n} numbers per layer (512 compressed K/V + 64 for a\n"
        "rotary key part all heads share), against GQA-8's {kv}. Each head's keys and values\n"
        "are linear maps of that latent, so decoding can fold the key map into the query and\n"
        "attend to the latents themselves (attnkit.layers.MultiHeadLatentAttention, the\n"
        "absorbed form). At the sizes above its cache is {r_mha:.1f}x smaller than MHA's and\n"
        "{r_gqa:.1f}x smaller than GQA-8's; MQA's is still {r_mqa:.2f}x smaller, but every\n"
        "head of an MLA layer keeps keys and values of its own. (The MLA rows count an\n"
        "attnkit.layers.MultiHeadLatentAttention and an attnkit.LatentCache.)",
    "fig_heads_suptitle": "Two heads of MultiHeadAttention({E}, {H}) attend differently",
    "fig_kv_per_token": "KV cache per token (KiB, fp16)",
    "fig_kv_title": "KV cache per token, whole model",
    "fig_params_layer": "parameters per layer (millions)",
    "fig_params_title": "Attention parameters per layer",

    # 5 ------------------------------------------------------------------------------
    "pad_sentences": [["cats", "sleep", "on", "trees"], ["dogs", "bark"]],
    "pad_intro":
        "Sentences in a batch have different lengths, so the short ones are padded to the\n"
        "longest. Padding is not text: no real token may attend to it. The mask sets those\n"
        "scores to -inf before the softmax, and exp(-inf) = 0. The batch:\n"
        "  sentence 1 (length {l1}):  {s1}\n"
        "  sentence 2 (length {l2}):  {s2}\n"
        "Scaled scores of sentence 2 with attnkit.masks.padding([{l1}, {l2}]):",
    "pad_weights":
        "Weights (from the library): the padded columns are exactly zero (largest weight\n"
        "on a padded key: {m}):",
    "pad_rows":
        "The padded rows (padding as a query) still get weights; their outputs are simply\n"
        "ignored downstream, e.g. by the loss.",
    "pad_nomask": "Without the mask, real tokens spend weight on padding:",
    "pad_wrong":
        "What goes wrong: a real token's output now depends on whatever sits in the\n"
        "padding. Replace the pad vectors by other ones and the output of \"{tok}\" changes\n"
        "by {d_nomask:.3f} without the mask, by {d_mask} with it. With the mask, sentence 2 in\n"
        "the batch gives the same output as sentence 2 alone, unpadded: max |diff| = {e:.1e}.",
    "fig_pad_mask": "padding mask, sentence 2 (length {n})",
    "fig_pad_with": "weights with the mask",
    "fig_pad_without": "weights without the mask",
    "fig_pad_suptitle": "Padded keys get exactly zero weight only with the mask",

    # 6 ------------------------------------------------------------------------------
    "pos_intro":
        "Attention by itself is blind to order: shuffle the keys and values together and\n"
        "the output does not change (measured: max |diff| = {e:.1e}). Four ways to bring\n"
        "positions back, inside the attention scores:",
    "t5_intro":
        "1) T5 relative buckets. Each head adds a learned bias that depends only on the\n"
        "offset key - query. Offsets are bucketed: below {exact} in size each has its own\n"
        "bucket, larger ones share logarithmically wider buckets, and from {maxd} on they all\n"
        "share the last one. attnkit.positional.relative_position_bucket (bidirectional,\n"
        "{nb} buckets):",
    "t5_offset": "offset",
    "t5_bucket": "bucket",
    "t5_toeplitz":
        "T5RelativeBias turns buckets into biases, so the bias is constant along every\n"
        "diagonal (same offset, same bias): largest spread along a diagonal = {e:.1e}.",
    "fig_t5_offset": "offset j − i (key − query)",
    "fig_t5_bucket": "bucket",
    "fig_t5_title1": "T5 buckets ({nb} buckets, max_distance {maxd})",
    "fig_t5_title2": "bucket of every (i, j), L = {L}",

    "alibi_intro":
        "2) ALiBi. No learned parameters: each head adds -slope * |i - j| to the scores, a\n"
        "penalty that grows linearly with distance. The slopes form a geometric sequence,\n"
        "so some heads look far and others near. attnkit.bias.alibi_slopes(8):\n"
        "  {s8}\n"
        "For 12 heads (not a power of two), the 8 slopes above followed by every other\n"
        "slope of 16 heads:\n"
        "  {s12}\n"
        "The bias of head 1 (slope {s:.3f}) under a causal mask:",
    "fig_alibi_head": "head {h}, slope {s:.3g}",
    "fig_bias": "bias added to the score",
    "fig_alibi_suptitle": "ALiBi: −slope·|i − j|, a different slope per head (causal)",

    "rope_intro":
        "3) RoPE rotates each pair of dimensions of q and k by an angle proportional to the\n"
        "position. Rotating q by m*theta and k by n*theta leaves (m - n)*theta in their dot\n"
        "product: the score depends on the offset only. The same q and k placed at different\n"
        "positions (attnkit.positional.RotaryEmbedding({d})):",
    "rope_outro":
        "Equal offsets, equal scores: along every diagonal of the {P} x {P} score matrix the\n"
        "largest spread is {e:.1e}; different offsets give different scores.",
    "rope_decay":
        "The picture's right panel: q = k = all ones (d = 64), so the score after RoPE is\n"
        "the mean of cos(n theta_k) over the 32 frequencies: 1 at distance 0, {d16:.2f} at\n"
        "16, {d64:.2f} at 64, {d255:.2f} at 255 (lowest {low:.2f}, at {at}). Rotation alone\n"
        "makes far tokens score lower for such a pair, with ripples (RoFormer's long-range\n"
        "decay); learned q and k can still score far tokens high.",
    "fig_rope_title1": "q_m · k_n after RoPE (d = {d}): constant along diagonals",
    "fig_key_pos_n": "key position n",
    "fig_query_pos_m": "query position m",
    "fig_rope_offset": "offset m − n",
    "fig_rope_score": "q·k / d  (q = k = all ones, d = 64)",
    "fig_rope_title2": "RoPE's long-range decay",

    "txl_intro":
        "4) Transformer-XL reads a long text segment by segment and keeps the previous\n"
        "segment's hidden states as memory: the {L} queries of the current segment also see\n"
        "the {M} memory positions, causally. Positions are relative, and the score splits into\n"
        "four terms (R: sinusoidal encoding of the distance i - j; u, v: learned biases):\n"
        "  (a) q.k content   (b) q.W_r R content-position   (c) u.k global content\n"
        "  (d) v.W_r R global position.\n"
        "For the first query of segment 2 (x0):",
    "txl_headers": ["key", "(a)", "(b)", "(c)", "(d)", "sum/sqrt(d)", "weight"],
    "txl_check":
        "Softmax of these four terms, times V and o_net, reproduces\n"
        "attnkit.layers.TransformerXLAttention(x, mems): max |diff| = {e:.1e}",
    "txl_memory":
        "Memory extends the context: without it, x0 (the first token of segment 2) could\n"
        "attend only to itself. With it, x0 sees {n} keys and puts {w:.0%} of its weight on\n"
        "the {M} memory positions (m0..m3, the previous segment), {cmp} the {u:.0%} an even\n"
        "spread over those {n} keys would give them.",
    "txl_more": "more than",
    "txl_less": "less than",
    "fig_txl_mask": "causal with memory: {L} queries, {M} memory + {L} keys",
    "fig_txl_weights": "Transformer-XL weights, segment 2",

    # 7 ------------------------------------------------------------------------------
    "long_longformer": "Longformer",
    "long_dilated": "Longformer, dilated",
    "long_mistral": "Mistral-style window",
    "long_dense": "dense",
    "long_intro":
        "Dense attention compares every query with every key: L^2 scores. Long-document\n"
        "models keep only some of them. Longformer: a sliding window plus a few global\n"
        "tokens (dilated windows in some heads); BigBird: window, global and random blocks;\n"
        "Mistral: a causal sliding window. Share of the L x L entries each pattern keeps\n"
        "(the same parameters at every length; attnkit.masks + materialize):",
    "long_headers": ["pattern", "spec (attnkit plot)", "L = 64", "L = 256", "L = 1024"],
    "fig_long_suptitle": "Sparse attention patterns, L = {n}",
    "sel_intro":
        "The newest models choose their keys instead: DeepSeek-V3.2's indexer scores every\n"
        "key and each query keeps its top k (masks.selected); NSA chooses blocks. What does\n"
        "top-k keep? Random q, k, v (L = {L}, d = {d}, causal), each query keeps k = {k} keys:\n"
        "its top k by score, or the last k (a window). Share of the softmax weight kept, and\n"
        "the output's relative distance from full attention (rows with more than k keys):",
    "sel_headers": ["attention", "weight kept: top-k", "window", "error: top-k", "window"],
    "sel_flat": "q . k / sqrt(d)",
    "sel_peaked": "4x sharper queries",
    "sel_outro":
        "Peaked: the top {k} keys hold {st:.0%} of the weight against {sw:.0%} for the window,\n"
        "and the output lands {et:.2f} from full attention against {ew:.2f}. Flat: {ft:.0%}\n"
        "against {fw:.0%} ({eft:.2f} against {efw:.2f}). Random keys carry no recency, so a\n"
        "window keeps about its share of the keys ({kw:.0%} on average); choosing by score\n"
        "keeps more, and the more concentrated the attention, the closer the top k come to\n"
        "all of it.",
    "mem_intro":
        "Memory: peak bytes allocated by one attention call (1 head, d = {d}), measured in a\n"
        "fresh subprocess with torch.profiler (profile_memory). \"dense\" materialises the\n"
        "L x L scores (backend=\"reference\"); \"chunked\" is attnkit's tiled online softmax,\n"
        "which never holds more than a tile of scores, once with full causal attention and\n"
        "once with a window of +-{w} plus a global token:",
    "mem_running": "measuring in a subprocess ...",
    "mem_headers": ["L", "dense (MiB)", "chunked causal (MiB)", "chunked window (MiB)",
                    "dense / window"],
    "mem_outro":
        "Dense memory grows about {g:.1f}x each time L doubles (L^2 scores); chunked grows\n"
        "about {gc:.1f}x (only O(L) outputs and statistics).",
    "mem_time_saved":
        "The window also saves time: at L = {L} one call took {tw:.1f} ms with the window\n"
        "against {tc:.1f} ms for full causal attention ({r:.1f}x) and {td:.1f} ms dense: the\n"
        "tiled engine skips the tiles the mask rules out.",
    "mem_time_not_saved":
        "At L = {L} the window did not save time in this run: {tw:.1f} ms against {tc:.1f} ms\n"
        "for full causal attention ({td:.1f} ms dense). It allows about {f:.0%} as many\n"
        "entries as causal attention, so each of its entries cost {x:.0f}x a causal one: it\n"
        "runs as many small tiles along the diagonal, causal as a few large ones.",
    "fig_mem_dense": "dense (materialised scores)",
    "fig_mem_chunked_causal": "chunked, causal",
    "fig_mem_chunked_window": "chunked, sliding window",
    "fig_mem_x": "sequence length L",
    "fig_mem_y": "peak allocated memory (MiB)",
    "fig_mem_title": "Peak memory of one attention call (1 head, d = {d})",
}
