"""Chinese texts of ``attnkit tour``: one ``str.format`` template per key.

The numbers are filled in at run time. Written for Chinese readers, not translated line
by line from :mod:`attnkit.tour.text_en`, which has the same keys. Paragraphs are wrapped
by hand (Chinese characters take two terminal columns).

Every Chinese character used here must exist in the shipped font subset
(``attnkit/fonts/``); ``tests/test_tour.py`` checks it, and
``python -m attnkit.fonts.make_subset`` rebuilds the subset after a text change.
"""

ZH = {
    "title": "attnkit 导览：把注意力机制一步一步真算出来",
    "header": "下面的每个数字都是现场用 attnkit 自己的函数算出来的（随机种子 {seed}）。\n"
              "图片保存在 {out}/",
    "no_cjk_font": "attnkit：没有找到中文字体，图里的中文可能显示成方框"
                   "（可以安装 fonts-noto-cjk）。",
    "picture": "图片：{path}",
    "elapsed": "（用时 {s:.1f} 秒）",
    "done": "\n全部完成，用时 {s:.1f} 秒。{n} 张图片保存在 {out}/：",
    "tokens": ["猫", "在", "树上"],

    "sec_why": "为什么需要注意力",
    "sec_seq2seq": "注意力从哪里来：现场训练 RNN 编码器-解码器",
    "sec_qkv": "从一句三个词的话算出 Q、K、V",
    "sec_cross": "自注意力与交叉注意力",
    "sec_heads": "多头、多查询与分组查询注意力",
    "sec_padding": "填充掩码（padding mask）",
    "sec_positions": "注意力里的位置信息",
    "sec_long": "长序列：稀疏模式与内存占用",

    # 1 ------------------------------------------------------------------------------
    "why_intro":
        "经典的编码器-解码器（基于 RNN 的 seq2seq）要把整句输入压进一个固定长度的向量，\n"
        "解码器只能看到这一个向量。句子越长，每个词在里面留下的痕迹就越淡。注意力换了个\n"
        "思路：输出的每个位置都可以直接回头看输入的每个位置，需要什么就取什么。\n"
        "\n"
        "做个实验：随机生成 n 个词向量（d = {d}，结果取 {trials} 个随机句子的平均）。\n"
        "“固定长度摘要”就是这些向量的平均值；注意力则用一个“想找第 1 个词”的查询\n"
        "（q = x_1）去读全部 n 个向量。两者交给下游的东西和第 1 个词有多像（余弦相似度）？\n"
        "再看第 1 个词对第 n 个位置还有多大影响：分别对 RNN（h_t = tanh(W h_(t-1) + U x_t)）\n"
        "和一层注意力求雅可比矩阵 ∂out_n/∂x_1 的范数。",
    "why_headers": ["n", "摘要余弦", "注意力余弦", "x_1 的权重", "RNN |∂h_n/∂x_1|",
                    "注意力 |∂y_n/∂x_1|"],
    "why_summary_steady":
        "每加长一次，平均摘要里第 1 个词的成分都更少：余弦从 {s0:.3f}（n = {n0}）降到\n"
        "{s1:.3f}（n = {n1}），{rel}（{e0:.3f} 到 {e1:.3f}）。",
    "why_near": "接近 1/√n",
    "why_far": "但和 1/√n 相差较远",
    "why_summary_noisy":
        "n 变大时，平均摘要里第 1 个词的成分变少：n = {n0} 时 {s0:.3f}，n = {n1} 时\n"
        "{s1:.3f}（1/√n：{e0:.3f} 到 {e1:.3f}），但不是每一步都降：每种长度只有\n"
        "{trials} 个随机句子，余弦有噪声（n = {na}：{sa:.3f}，n = {nb}：{sb:.3f}）。",
    "why_summary_flat":
        "这里平均摘要与第 1 个词的余弦没有下降（n = {n0} 时 {s0:.3f}，n = {n1} 时\n"
        "{s1:.3f}）；按 1/√n 应从 {e0:.3f} 降到 {e1:.3f}。",
    "why_attn_keeps":
        "注意力依然能找回第 1 个词：输出与它的余弦至少为 {low:.3f}。",
    "why_rnn":
        "在 RNN 里，|dh_n/dx_1| 从 n = {n0} 到 n = {n1} 缩小了 {f:.1e} 倍：第 1 个词的信号\n"
        "要穿过 n - 1 步，每一步都乘上 W 和小于 1 的 tanh'，所以按几何级数衰减。",
    "why_attn_grad":
        "注意力的 |dy_n/dx_1| 也缩小了 {f:.0f} 倍，但原因不同：第 n 个位置的查询\n"
        "把 softmax 分给 n 个键，平均每个键分到 1/n 的权重，而 1/n 从 n = {n0} 到\n"
        "n = {n1} 缩小 {nf:.0f} 倍。这是多项式级的下降，不是几何级的：任意两个位置之间\n"
        "只隔一步，所以捕捉长距离依赖不需要循环，所有位置还能并行计算。{steady}",
    "why_not_every_step": "\n（它的下降并不平稳：每种长度都换了一批随机句子。）",
    "fig_why_summary": "固定长度摘要（取平均）",
    "fig_why_attn": "注意力，q = x₁",
    "fig_why_n": "序列长度 n",
    "fig_why_cos": "与第 1 个词的余弦相似度",
    "fig_why_title1": "解码器还能拿到多少第 1 个词的信息",
    "fig_why_attn_layer": "一层注意力",
    "fig_why_grad": "‖∂ out_n / ∂ x₁‖",
    "fig_why_title2": "第 1 个词对第 n 个位置的影响",

    # 1b -----------------------------------------------------------------------------
    "s2s_intro":
        "注意力最早是为做翻译的 RNN 编码器-解码器发明的。下面现场在这台机器上训练三个模型，\n"
        "任务是把一串字母倒过来写（字母表 {v} 个，长度 {lo} 到 {hi}）：双向 GRU 编码器，\n"
        "{hidden} 维的 GRU 解码器，三者的随机种子、训练批次和预算完全相同（{steps} 步 Adam，\n"
        "每步 {batch} 句）：\n"
        "  无注意力  解码器只拿到一个向量，即编码器的最终状态（Sutskever 等 2014，Cho 等\n"
        "            2014），整句话都得塞进这个向量；\n"
        "  加性      每一步都给编码器的每个状态打分，v^T tanh(W_q s + W_k h_j)\n"
        "            （Bahdanau 等 2015：attnkit.layers.AdditiveAttention）；\n"
        "  通用      打分是 s^T W h_j（Luong 等 2015 的 general：LuongAttention）。\n"
        "每个长度区间最多取 200 句训练时从未抽到过的句子（长度 3-4 的句子总共只有几千种），\n"
        "看完全正确（每个输出字母都对）的比例：",
    "s2s_variant": "解码器",
    "s2s_bucket": "长度 {b}",
    "s2s_loss": "最终损失",
    "s2s_time": "训练用时",
    "s2s_label_None": "无注意力",
    "s2s_label_additive": "加性",
    "s2s_label_general": "通用",
    "s2s_falls":
        "没有注意力时，准确率从 {b0} 个字母的 {a0:.0%} 掉到 {b1} 个字母的 {a1:.0%}：\n"
        "一个和解码器一样宽的向量装不下长句子。",
    "s2s_not_falls":
        "没有注意力时，准确率从 {b0} 个字母的 {a0:.0%} 变到 {b1} 个字母的 {a1:.0%}：\n"
        "这个种子下，瓶颈没有表现为降到一半以下。",
    "s2s_untrained":
        "没有注意力时，{b0} 个字母的准确率是 {a0:.0%}，{b1} 个字母是 {a1:.0%}：连短句都没\n"
        "学会，看不出它在长句上表现如何。",
    "s2s_over": "高",
    "s2s_below": "低",
    "s2s_holds":
        "用{name}注意力，每种长度都保持在 {low:.0%} 以上（{b1} 个字母时 {last:.0%}，\n"
        "比无注意力{side} {gain:.0f} 个百分点）。",
    "s2s_weak":
        "用{name}注意力，最差的长度只有 {low:.0%}（{b1} 个字母时 {last:.0%}，比无注意力\n"
        "{side} {gain:.0f} 个百分点）。",
    "s2s_result": "{plain}\n{attended}",
    "s2s_alignment":
        "图的右半部分是加性注意力模型倒写一句 {n} 个字母的新句子时的注意力：平均每一步\n"
        "输出把 {share:.0%} 的权重放在它应当写出的源字母（对称位置上的那个）上，平均分配\n"
        "的话只有 {uniform:.0%}。没有人告诉它该看哪里：这种对齐完全是从损失里学出来的。",
    "s2s_outro":
        "注意力去掉了“一个向量”的瓶颈；Transformer（2017）又去掉了循环：这个导览接下来\n"
        "讲的都是这种注意力，即缩放点积注意力。",
    "fig_s2s_length": "源序列长度（字母数）",
    "fig_s2s_accuracy": "完全正确的比例",
    "fig_s2s_title1": "倒写序列，每个模型训练 {steps} 步",
    "fig_s2s_title2": "倒写时的加性注意力",
    "fig_s2s_source": "源字母",
    "fig_s2s_output": "输出步",

    # 2 ------------------------------------------------------------------------------
    "qkv_embed":
        "每个词先查出一个词向量（d_model = {d}），再加上正弦位置编码。这样同一个词放在\n"
        "不同位置，得到的向量也不一样。",
    "qkv_name_E": "E：词向量",
    "qkv_name_P": "P：位置编码（attnkit.positional.sinusoidal_encoding）",
    "qkv_name_X": "X = E + P",
    "qkv_proj":
        "三个可学习的矩阵（这里用固定种子随机初始化）把 X 分别投影成查询、键、值，维度\n"
        "d_k = {dk}。Q 负责“提问”，K 负责“自我介绍”，V 是真正要交出去的内容。",
    "qkv_scores": "打分：每个查询和每个键做点积，得到 Q K^T（行是查询，列是键）：",
    "qkv_scaled": "再除以 √d_k = {s:.2f}：",
    "qkv_weights":
        "对每一行做 softmax，就得到注意力权重，每行之和为 1。下面这组数直接取自\n"
        "attnkit.scaled_dot_product_attention(Q, K, V, return_weights=True)：",
    "qkv_check": "对上面缩放后的打分做 softmax，与库函数给出的权重对比：最大误差 {e:.1e}",
    "qkv_out": "每个词的输出就是权重乘以 V，即对各个值向量加权求和：",
    "qkv_out_check": "weights @ V 与库函数的输出对比：最大误差 {e:.1e}",
    "qkv_analogy":
        "打个比方：去图书馆找书。你带着一段“我想找什么”的描述进门（查询 Q）；每本书都有\n"
        "一张目录卡片（键 K）和书本身的内容（值 V）。你拿描述逐张比对卡片（点积），按匹配\n"
        "程度分配阅读时间，所有份额加起来等于 1（softmax），最后读到的是各本书内容按比例\n"
        "混合的结果（对 V 加权求和）。和真的查目录不同，这里不是非此即彼：每本书都会贡献\n"
        "一点，只是多少不同。",
    "fig_key": "键",
    "fig_query": "查询",
    "fig_score": "打分",
    "fig_weight": "注意力权重",
    "fig_weights_title": "softmax → 权重",
    "fig_qkv_suptitle": "“猫 在 树上”的打分与注意力权重",

    "scale_intro":
        "为什么要除以 √d_k？如果 q、k 每一维的均值为 0、方差为 1，那么 q·k 是 d_k 个乘积\n"
        "之和，方差就是 d_k。下面用 {n} 对随机向量实测方差；softmax 作用在 {keys} 个键上，\n"
        "用熵衡量权重有多“平均”（熵 = ln {keys} = {hmax:.2f} 表示完全均匀，0 表示权重全压在\n"
        "一个键上）：",
    "scale_headers": ["d_k", "Var(q·k)", "Var(q·k/√d_k)", "不缩放的熵", "缩放后的熵",
                      "不缩放最大权重", "缩放后最大权重"],
    "scale_outro":
        "不缩放时，q·k 的方差从 {v0:.1f}（d_k = {d0}）涨到 {v1:.1f}（d_k = {d1}），softmax\n"
        "随之饱和：熵从 {h0:.2f} 降到 {h1:.2f}，最大的权重达到 {m1:.2f}，接近独热的选择，\n"
        "梯度几乎消失（离开最大值，softmax 是平的）。除以 √d_k 之后，各种宽度下熵都在\n"
        "{lo:.2f} 到 {hi:.2f} 之间。",
    "scale_outro_flat":
        "不缩放时，q·k 的方差从 {v0:.1f}（d_k = {d0}）涨到 {v1:.1f}（d_k = {d1}）；这次运行中\n"
        "熵没有下降（{h0:.2f} 到 {h1:.2f}）。除以 √d_k 之后，各种宽度下熵都在 {lo:.2f} 到\n"
        "{hi:.2f} 之间。",
    "fig_variance": "方差",
    "fig_scale_title1": "q·k 的方差随 d_k 增长",
    "fig_unscaled": "不缩放：softmax(q·k)",
    "fig_scaled": "缩放：softmax(q·k / √d_k)",
    "fig_uniform": "{n} 个键上完全均匀",
    "fig_entropy": "权重的熵（nat）",
    "fig_scale_title2": "{n} 个键上的 softmax：不缩放就会饱和",

    # 3 ------------------------------------------------------------------------------
    "cross_intro":
        "计算完全一样，区别只在 Q、K、V 从哪里来：自注意力里三者来自同一个序列；交叉注意力\n"
        "里，查询来自一个序列（解码器），键和值来自另一个序列（编码器的输出）。来看一个\n"
        "迷你翻译模型（词向量是特意构造的：两种语言里意思相同的词，向量也相近，相当于\n"
        "训练好的模型学到的东西）：\n"
        "  编码器读入  {src}\n"
        "  解码器生成  {tgt}",
    "cross_enc": "编码器自注意力：Q、K、V 都来自编码器的 {S} 个词：",
    "cross_dec": "解码器自注意力，带因果掩码（不能偷看后面的词），{L} × {L}：",
    "cross_cross":
        "交叉注意力：Q 来自解码器（{L} 个词），K 和 V 来自编码器（{S} 个词），所以权重\n"
        "矩阵是 {L} × {S}：",
    "cross_best": "解码器的每个词，以及它最关注的源语言词：",
    "cross_same":
        "三处用的都是同一个 attnkit.MultiHeadAttention 类，只是输入不同。交叉注意力层的\n"
        "输出，与先投影解码器的查询和编码器的键/值、再调用 scaled_dot_product_attention\n"
        "的结果一致：最大误差 {e:.1e}",
    "cross_all_found": "有对应词的 {n} 个解码器词，都把最大的权重放在了各自的对应词上。",
    "cross_some_found":
        "有对应词的 {n} 个解码器词里，{k} 个把最大的权重放在对应词上；“{word}”最关注的是\n"
        "“{got}”（{w:.2f}）。",
    "cross_zai_split": "“在”把权重分给了 is（{a:.2f}）和 on（{b:.2f}）。",
    "cross_zai_one": "“在”对应 is on，但它没有平分权重：is 上 {a:.2f}，on 上 {b:.2f}。",
    "cross_the_source": "没有哪个解码器词在 the 上放超过 {m:.2f} 的权重，the 没有对应词。",
    "cross_is_on": "is 在“在”上放了 {a:.2f}，on 放了 {b:.2f}：“在”同时对应这两个词。",
    "cross_the_spread":
        "the 在中文里没有对应词：它最大的一个权重只有 {m:.2f}，低于每个有对应词的词给\n"
        "对应词的 {r:.2f}，权重比较分散。",
    "cross_the_sharp":
        "the 在中文里没有对应词，但它有一个权重达到 {m:.2f}（有对应词的词给对应词的权重\n"
        "至少 {r:.2f}）。",
    "cross_outro": "交叉注意力本质上是两句话之间一种“软”的、可学习的对齐。",
    "fig_enc_self": "编码器自注意力",
    "fig_dec_self": "解码器自注意力（因果）",
    "fig_cross": "交叉注意力",
    "fig_key_enc": "键（编码器）",
    "fig_query_dec": "查询（解码器）",
    "fig_cross_suptitle": "迷你编码器-解码器里的自注意力与交叉注意力",

    # 4 ------------------------------------------------------------------------------
    "heads_intro":
        "多头注意力把 d_model = {E} 切成 {H} 个头，每个头 {d} 维。每个头拿到投影矩阵里属于\n"
        "自己的那一段，在各自的子空间里比较词与词，所以关注的地方可以不一样。用\n"
        "attnkit.MultiHeadAttention({E}, {H}) 处理我们的句子（need_weights=True），各个头的\n"
        "权重如下：",
    "head": "第 {h} 个头",
    "heads_gqa":
        "键和值不一定要和查询头一一对应。MHA：每个查询头都有自己的 K/V 头；GQA（分组查询）：\n"
        "一组查询头共用一个 K/V 头；MQA（多查询）：所有查询头共用同一个 K/V 头。attnkit 靠\n"
        "索引实现共享，不复制 K/V：{hq} 个查询头配 {hkv} 个 K/V 头，和把每个 K/V 头重复\n"
        "{g} 次的结果一致，最大误差 {e:.1e}。",
    "heads_real":
        "为什么要在意这个？推理时 KV 缓存要存下每一层、每个历史词元（token）的\n"
        "K 和 V，它的大小直接限制了 batch 能开多大、上下文能拉多长。下面的尺寸取自模型公开的 config（hidden\n"
        "4096，32 层，32 个查询头，每头 128 维；Llama-2-7B 有 32 个 K/V 头，Llama-3-8B\n"
        "只有 8 个）。参数量来自在 meta 设备上构建的 attnkit.MultiHeadAttention（不占内存），\n"
        "缓存字节数来自一个存了 1 个 fp16 词元的 attnkit.KVCache，再乘以层数；{ctx} 是\n"
        "Llama-3-8B 的上下文长度：",
    "heads_headers": ["模型", "Q 头数", "K/V 头数", "每头维度", "每层注意力参数", "全部层",
                      "每词元 KV 缓存", "8192 词元 KV 缓存"],
    "mqa_name": "MQA（同尺寸）",
    "mla_name": "MLA（同尺寸）",
    "latent_kv": "潜向量 {n}",
    "heads_outro":
        "用 8 个 K/V 头的 GQA，KV 缓存只有 MHA 的 1/{r_gqa:.0f}；MQA 更是只有 1/{r_mqa:.0f}，\n"
        "但质量会有些损失。GQA 论文（Ainslie 等，2023）的结论是：GQA 的质量接近 MHA，\n"
        "速度接近 MQA。所以 Llama 3、Mistral、Qwen2 这些模型都选了 GQA。",
    "heads_mla":
        "MLA（多头潜在注意力，DeepSeek-V2 和 V3）既不缓存 K 也不缓存 V：每个词元在每层\n"
        "只留下一个 {n} 维的潜向量（512 维压缩的 K/V，加上所有头共用的 64 维旋转键），\n"
        "GQA-8 则是 {kv} 个数。每个头的键和值都是这个潜向量的线性映射，所以解码时可以把\n"
        "键的映射并进查询，直接对潜向量做注意力（attnkit.layers.MultiHeadLatentAttention\n"
        "的吸收形式）。在上面的尺寸下，它的缓存比 MHA 小 {r_mha:.1f} 倍，比 GQA-8 小\n"
        "{r_gqa:.1f} 倍；MQA 的缓存仍要再小 {r_mqa:.2f} 倍，但 MLA 的每个头都有自己的键和值。\n"
        "（MLA 两行的数字来自 attnkit.layers.MultiHeadLatentAttention 和 attnkit.LatentCache。）",
    "fig_heads_suptitle": "MultiHeadAttention({E}, {H}) 的两个头关注点不同",
    "fig_kv_per_token": "每个词元的 KV 缓存（KiB，fp16）",
    "fig_kv_title": "整个模型每个词元的 KV 缓存",
    "fig_params_layer": "每层参数量（百万）",
    "fig_params_title": "每层注意力的参数量",

    # 5 ------------------------------------------------------------------------------
    "pad_sentences": [["猫", "在", "树上", "睡觉"], ["狗", "叫"]],
    "pad_intro":
        "同一个 batch 里的句子长短不一，短句要补齐（padding）到最长句的长度。补上去的位置\n"
        "不是真实内容，任何真实的词都不该关注它们。掩码的做法是在 softmax 之前把这些位置的\n"
        "打分设为 -inf，因为 exp(-inf) = 0。这个 batch：\n"
        "  第 1 句（长度 {l1}）：{s1}\n"
        "  第 2 句（长度 {l2}）：{s2}\n"
        "对第 2 句应用 attnkit.masks.padding([{l1}, {l2}]) 之后的缩放打分：",
    "pad_weights":
        "权重（库函数算出）：填充列严格等于 0（填充键上的最大权重：{m}）：",
    "pad_rows":
        "填充位置作为查询时也会算出权重，下游（比如计算损失时）直接忽略这几行即可。",
    "pad_nomask": "如果不加掩码，真实的词会把一部分权重分给填充位置：",
    "pad_wrong":
        "问题出在哪？真实词的输出会受到填充位置里那些向量的影响。把填充向量换成别的值，\n"
        "“{tok}”的输出在没有掩码时变了 {d_nomask:.3f}，有掩码时变化为 {d_mask}。有了掩码，\n"
        "batch 里的第 2 句和单独计算（不补齐）的结果完全一致：最大误差 {e:.1e}。",
    "fig_pad_mask": "第 2 句的填充掩码（长度 {n}）",
    "fig_pad_with": "加掩码的权重",
    "fig_pad_without": "不加掩码的权重",
    "fig_pad_suptitle": "只有加了掩码，填充位置的权重才严格为 0",

    # 6 ------------------------------------------------------------------------------
    "pos_intro":
        "注意力本身对顺序是“盲”的：把键和值一起打乱顺序，输出完全不变（实测最大误差\n"
        "{e:.1e}）。下面四种做法，都是在注意力打分里把位置信息加回来：",
    "t5_intro":
        "1）T5 的相对位置分桶。每个头在打分上加一个可学习的偏置，只取决于相对偏移\n"
        "（键位置 - 查询位置）。偏移先分桶：绝对值小于 {exact} 的每个偏移独占一个桶，更远的\n"
        "按对数间隔共用越来越宽的桶，{maxd} 及以上全部落进最后一个桶。\n"
        "attnkit.positional.relative_position_bucket（双向，{nb} 个桶）：",
    "t5_offset": "偏移",
    "t5_bucket": "桶",
    "t5_toeplitz":
        "T5RelativeBias 再把桶号换成偏置，所以偏置沿每条对角线都是常数（偏移相同，偏置\n"
        "就相同）：同一条对角线上的最大差异 = {e:.1e}。",
    "fig_t5_offset": "偏移 j − i（键 − 查询）",
    "fig_t5_bucket": "桶编号",
    "fig_t5_title1": "T5 分桶（{nb} 个桶，max_distance {maxd}）",
    "fig_t5_title2": "每个 (i, j) 的桶编号，L = {L}",

    "alibi_intro":
        "2）ALiBi。没有任何可学习参数：每个头在打分上加 -slope × |i - j|，距离越远扣分越多，\n"
        "线性增长。各头的斜率是等比数列，有的头看得远，有的头只看眼前。\n"
        "attnkit.bias.alibi_slopes(8)：\n"
        "  {s8}\n"
        "12 个头（不是 2 的幂）时，先取上面 8 个头的斜率，再从 16 个头的斜率里隔一个取一个：\n"
        "  {s12}\n"
        "第 1 个头（斜率 {s:.3f}）在因果掩码下的偏置：",
    "fig_alibi_head": "第 {h} 个头，斜率 {s:.3g}",
    "fig_bias": "加到打分上的偏置",
    "fig_alibi_suptitle": "ALiBi：−slope·|i − j|，每个头斜率不同（因果）",

    "rope_intro":
        "3）RoPE（旋转位置编码）把 q 和 k 的每两维看成一个平面，按位置旋转一个角度。q 在\n"
        "位置 m 转 m·θ，k 在位置 n 转 n·θ，点积里只剩下 (m - n)·θ，所以打分只和相对偏移有关。\n"
        "把同一对 q、k 放到不同位置（attnkit.positional.RotaryEmbedding({d})）：",
    "rope_outro":
        "偏移相同，打分就相同：{P} × {P} 打分矩阵每条对角线上的最大差异只有 {e:.1e}；\n"
        "偏移不同，打分才不同。",
    "rope_decay":
        "图的右半部分：q = k = 全 1 向量（d = 64），旋转后的打分就是 32 个频率上 cos(n θ_k)\n"
        "的平均：距离 0 时为 1，16 时 {d16:.2f}，64 时 {d64:.2f}，255 时 {d255:.2f}（最低\n"
        "{low:.2f}，在距离 {at}）。单靠旋转，这样一对 q、k 离得越远打分越低，但有起伏\n"
        "（RoFormer 所说的远程衰减）；学出来的 q、k 仍然可以给远处的词元打高分。",
    "fig_rope_title1": "RoPE 之后的 q_m · k_n（d = {d}）：沿对角线不变",
    "fig_key_pos_n": "键位置 n",
    "fig_query_pos_m": "查询位置 m",
    "fig_rope_offset": "偏移 m − n",
    "fig_rope_score": "q·k / d（q = k = 全 1，d = 64）",
    "fig_rope_title2": "RoPE 的远程衰减",

    "txl_intro":
        "4）Transformer-XL 把长文本切成一段一段来读，并把上一段的隐状态留作“记忆”：当前段\n"
        "的 {L} 个查询除了看本段，还能按因果顺序看到 {M} 个记忆位置。它用相对位置编码，打分\n"
        "拆成四项（R 是距离 i - j 的正弦编码，u、v 是可学习的偏置）：\n"
        "  (a) q·k 内容项   (b) q·W_r R 内容-位置项   (c) u·k 全局内容偏置\n"
        "  (d) v·W_r R 全局位置偏置。\n"
        "下面是第 2 段第一个查询（x0）的四项：",
    "txl_headers": ["键", "(a)", "(b)", "(c)", "(d)", "求和/√d", "权重"],
    "txl_check":
        "用这四项算 softmax，再乘 V、过 o_net，结果与\n"
        "attnkit.layers.TransformerXLAttention(x, mems) 一致：最大误差 {e:.1e}",
    "txl_memory":
        "记忆延长了上下文：没有记忆时，x0（第 2 段的第一个词元）只能看到它自己。有了记忆，\n"
        "x0 能看到 {n} 个键，并把 {w:.0%} 的权重放在 {M} 个记忆位置上（m0..m3，也就是上一段），\n"
        "{cmp}在这 {n} 个键上平均分配时记忆位置所得的 {u:.0%}。",
    "txl_more": "多于",
    "txl_less": "少于",
    "fig_txl_mask": "带记忆的因果掩码：{L} 个查询，{M} 个记忆 + {L} 个键",
    "fig_txl_weights": "Transformer-XL 第 2 段的权重",

    # 7 ------------------------------------------------------------------------------
    "long_longformer": "Longformer",
    "long_dilated": "Longformer（空洞窗口）",
    "long_mistral": "Mistral 式滑动窗口",
    "long_dense": "稠密",
    "long_intro":
        "稠密注意力要把每个查询和每个键都比一遍，共 L² 个打分。长文档模型只保留其中一部分：\n"
        "Longformer 用滑动窗口加少量全局词（部分头用空洞窗口）；BigBird 用窗口块、全局块和\n"
        "随机块；Mistral 用因果滑动窗口。各模式保留的 L × L 打分比例（参数固定、长度变化；\n"
        "用 attnkit.masks 构造，materialize 统计）：",
    "long_headers": ["模式", "写法（attnkit plot）", "L = 64", "L = 256", "L = 1024"],
    "fig_long_suptitle": "稀疏注意力模式，L = {n}",
    "sel_intro":
        "最新的模型改为自己挑选键：DeepSeek-V3.2 的索引器给每个键打分，每个查询只保留得分最高的\n"
        "k 个（masks.selected）；NSA 挑选的是块。top-k 留下了什么？随机的 q、k、v（L = {L}，\n"
        "d = {d}，因果），每个查询保留 k = {k} 个键：按得分取前 k 个，或取最近的 k 个（窗口）。\n"
        "下表是保留下来的 softmax 权重比例，以及输出与完整注意力的相对距离（只统计键多于 k 的行）：",
    "sel_headers": ["注意力", "保留权重：top-k", "窗口", "误差：top-k", "窗口"],
    "sel_flat": "q · k / sqrt(d)",
    "sel_peaked": "查询放大 4 倍（更尖锐）",
    "sel_outro":
        "注意力尖锐时：前 {k} 个键保留了 {st:.0%} 的权重，窗口只有 {sw:.0%}；输出与完整注意力的距离\n"
        "分别是 {et:.2f} 和 {ew:.2f}。打分平坦时：{ft:.0%} 对 {fw:.0%}（距离 {eft:.2f} 对 {efw:.2f}）。\n"
        "随机的键没有“越近越重要”的规律，窗口保留的权重大约就是它所占键的比例（平均 {kw:.0%}）；按得分挑选保留得\n"
        "更多，注意力越集中，前 k 个键就越接近全部。",
    "mem_intro":
        "再看内存：一次注意力调用（1 个头，d = {d}）分配内存的峰值，在一个全新的子进程里\n"
        "用 torch.profiler（profile_memory）测量。“稠密”会把 L × L 的打分整个存下来\n"
        "（backend=\"reference\"）；“分块”是 attnkit 的分块在线 softmax，任何时候最多只存\n"
        "一块打分。分块各测两次：完整的因果注意力，以及 ±{w} 的滑动窗口加一个全局词：",
    "mem_running": "正在子进程里测量……",
    "mem_headers": ["L", "稠密 (MiB)", "分块·因果 (MiB)", "分块·窗口 (MiB)", "稠密/窗口"],
    "mem_outro":
        "L 每翻一倍，稠密注意力的内存涨到约 {g:.1f} 倍（L² 个打分）；分块只涨到约 {gc:.1f} 倍\n"
        "（只存 O(L) 的输出和统计量）。",
    "mem_time_saved":
        "滑动窗口还省时间：L = {L} 时，带窗口的一次调用用了 {tw:.1f} ms，完整因果注意力\n"
        "用了 {tc:.1f} ms（{r:.1f} 倍），稠密路径 {td:.1f} ms：分块引擎直接跳过掩码排除的块。",
    "mem_time_not_saved":
        "这次运行中，L = {L} 时滑动窗口没有省时间：{tw:.1f} ms，完整因果注意力 {tc:.1f} ms\n"
        "（稠密 {td:.1f} ms）。它允许的元素约为因果注意力的 {f:.0%}，所以每个元素的代价是\n"
        "因果注意力的 {x:.0f} 倍：它在对角线附近算许多小块，因果注意力只算几个大块。",
    "fig_mem_dense": "稠密（存下全部打分）",
    "fig_mem_chunked_causal": "分块，因果",
    "fig_mem_chunked_window": "分块，滑动窗口",
    "fig_mem_x": "序列长度 L",
    "fig_mem_y": "分配内存峰值（MiB）",
    "fig_mem_title": "一次注意力调用的内存峰值（1 个头，d = {d}）",
}
