"""General English and Chinese paragraphs, written for this project, that the tokenizer trains on.

They give the BPE merges for ordinary words, numbers and punctuation beyond the synthetic corpus's small
vocabulary (`python -m data_tools.train_tokenizer`). Changing this text changes the built tokenizer:
rebuild `vlm/assets/tokenizer` afterwards.
"""

GENERAL_TEXT = (
    # English: everyday life, nature, work, science and computing.
    "Every morning the small town wakes up slowly. The baker opens his shop before sunrise, and the smell "
    "of fresh bread drifts down the street. Children walk to school in groups, talking about games, friends "
    "and homework. Their parents hurry to the station to catch the early train into the city.",
    "The weather changes quickly in spring. One day is warm and bright, the next is cold and windy, and "
    "sometimes it rains for a whole week. Farmers watch the sky carefully, because the right time to plant "
    "seeds depends on the temperature of the soil and the amount of water in the ground.",
    "A good recipe is like a clear set of instructions. First, wash the vegetables and cut them into thin "
    "pieces. Then heat a little oil in a pan, add garlic and onion, and cook them until they turn golden. "
    "Add the rest of the ingredients, stir gently, and season with salt and pepper. Serve it hot with rice.",
    "Travelling teaches us about other people and about ourselves. When you visit a new country, you notice "
    "how differently people greet each other, what they eat for breakfast, and how they spend their free "
    "time. Learning a few words of the local language is a simple way to show respect.",
    "Reading is one of the best habits a person can build. Books carry ideas across centuries and oceans. A "
    "novel lets you live many lives, while a history book explains how the world became what it is today. "
    "Even twenty minutes of reading each evening adds up to dozens of books every year.",
    "Science begins with questions. Why is the sky blue? Why do leaves change colour in autumn? How far away "
    "is the moon? Scientists make careful observations, form a hypothesis, design experiments to test it, "
    "and share their results so that others can check and repeat the work.",
    "Light from the sun contains every colour of the rainbow. When sunlight passes through the air, blue "
    "light is scattered more strongly than red light, which is why the sky looks blue during the day and "
    "the sunset often looks orange or red. Rainbows appear when light bends inside drops of water.",
    "The human body is a remarkable system. The heart pumps blood through a network of vessels, carrying "
    "oxygen and nutrients to every cell. The lungs exchange gases with the air, the stomach digests food, "
    "and the brain coordinates everything, from simple reflexes to memory, language and thought.",
    "Animals have adapted to nearly every environment on Earth. Camels store fat and survive long journeys "
    "across hot deserts. Penguins huddle together to stay warm through the polar winter. Fish breathe "
    "through gills, birds fly with hollow bones, and bees communicate by dancing.",
    "A computer follows instructions written in a programming language. A program reads input, processes "
    "data, and produces output. Variables store values, functions group steps that belong together, and "
    "loops repeat an action many times. Good programmers write code that other people can read easily.",
    "Machine learning is a way of building programs that learn from examples instead of following rules "
    "written by hand. A model is trained on a dataset, its parameters are adjusted to reduce the error, and "
    "then it is evaluated on new examples that it has never seen before. Training a neural network needs "
    "data, a loss function, an optimizer and patience.",
    "A language model predicts the next token in a sequence. The text is first split into tokens by a "
    "tokenizer, each token is mapped to a vector, and a transformer with attention layers combines the "
    "vectors to produce a probability for every possible next token. A vision encoder turns an image into "
    "features that the language model can read.",
    "Mathematics is the language of patterns. Numbers count things, geometry describes shapes and space, "
    "algebra works with unknown quantities, and statistics helps us reason about uncertainty. For example, "
    "2 + 3 = 5, 7 x 8 = 56, and the area of a circle with radius r is pi times r squared.",
    "The meeting starts at 9:30 on Monday, 14 March, in room 204. Please bring your laptop, the report from "
    "last quarter and any questions you have. We will discuss the budget, the schedule for the next three "
    "months, and how to improve communication between the teams.",
    "Music can change how we feel in a few seconds. A slow melody may make us calm or sad, while a fast "
    "rhythm makes us want to dance. People have made music for thousands of years, with drums, flutes, "
    "strings, and their own voices, to celebrate, to mourn and to tell stories.",
    "Health depends on simple things done every day: enough sleep, regular exercise, clean water and a "
    "balanced diet with fruit, vegetables, grains and protein. Walking for half an hour, drinking water "
    "instead of sugary drinks, and spending time with friends all make a real difference.",
    "Cities are growing all over the world. Good public transport, safe streets for bicycles, parks, "
    "libraries and affordable housing make a city a pleasant place to live. Planners must balance the "
    "needs of residents, businesses and visitors while protecting the environment.",
    "The ocean covers more than seventy percent of the planet. It produces much of the oxygen we breathe, "
    "absorbs heat and carbon dioxide, and is home to millions of species, from tiny plankton to enormous "
    "whales. Protecting the ocean from pollution and overfishing matters for everyone.",
    "When you learn a new skill, progress is rarely smooth. At first everything feels difficult and slow. "
    "With practice, small steps become automatic, and you can focus on harder problems. Mistakes are not "
    "failures; they show you exactly what to practise next.",
    "Thank you for your message. I am sorry for the late reply; I was away last week. Yes, I would be happy "
    "to help with the project. Could we talk on Thursday afternoon? Let me know which time suits you best, "
    "and I will send a short summary of my ideas before the call.",
    "History is full of inventions that changed daily life: the wheel, paper, printing, the compass, the "
    "steam engine, electricity, the telephone, the airplane and the internet. Each one made it easier for "
    "people to travel, to trade, to share knowledge and to work together.",
    "In the garden, tomatoes need plenty of sunlight, lettuce grows well in cooler weather, and herbs such "
    "as basil and mint are easy to keep in small pots. Water the plants early in the morning, remove the "
    "weeds often, and add compost to keep the soil rich.",
    "Questions and answers: What time is it? It is half past four. Where is the library? It is next to the "
    "post office, opposite the park. How much does this cost? It costs twelve dollars. Which one do you "
    "prefer, the green one or the brown one? I prefer the brown one, thank you.",
    # Chinese: the same kinds of topics.
    "每天早上，小镇慢慢醒来。面包店在日出之前开门，新鲜面包的香味飘满了整条街。孩子们三五成群地走路去学校，"
    "一边走一边聊游戏、朋友和作业。他们的父母匆忙赶到车站，坐早班火车进城上班。",
    "春天的天气变化很快。今天阳光明媚、温暖舒适，明天就可能又冷又刮风，有时候还会连续下一个星期的雨。"
    "农民们仔细观察天空，因为播种的最佳时间取决于土壤的温度和地里的水分。",
    "一份好的菜谱就像一套清楚的说明。先把蔬菜洗干净，切成薄片。然后在锅里烧热少许油，放入大蒜和洋葱，"
    "炒到金黄色。再加入其他材料，轻轻翻炒，用盐和胡椒调味。最后趁热和米饭一起吃。",
    "旅行让我们了解别人，也了解自己。到一个新的国家，你会注意到人们打招呼的方式、早餐吃什么，"
    "以及怎样度过空闲时间。学会几句当地的语言，是表示尊重的简单方法。",
    "读书是一个人能养成的最好的习惯之一。书本把思想带过几百年的时间和辽阔的海洋。小说让你体验许多不同的人生，"
    "历史书解释世界是怎样变成今天这个样子的。每天晚上读二十分钟，一年下来就能读完几十本书。",
    "科学从问题开始。天空为什么是蓝色的？秋天的树叶为什么会变颜色？月亮离我们有多远？科学家认真观察，"
    "提出假设，设计实验来检验它，并且分享结果，让别人可以检查和重复这些工作。",
    "太阳光里包含彩虹的所有颜色。阳光穿过空气时，蓝光比红光散射得更厉害，所以白天的天空看起来是蓝色的，"
    "而日落常常是橙色或红色的。光在水滴里发生折射，就会出现彩虹。",
    "人体是一个了不起的系统。心脏把血液输送到全身的血管里，为每一个细胞带去氧气和营养。"
    "肺和空气交换气体，胃消化食物，大脑协调一切，从简单的反射到记忆、语言和思考。",
    "动物几乎适应了地球上的每一种环境。骆驼储存脂肪，能够穿越炎热的沙漠。企鹅挤在一起，"
    "度过寒冷的极地冬天。鱼用鳃呼吸，鸟靠中空的骨头飞翔，蜜蜂用跳舞来交流。",
    "计算机按照用编程语言写成的指令工作。程序读取输入，处理数据，然后产生输出。变量保存数值，"
    "函数把相关的步骤组织在一起，循环把一个动作重复很多次。好的程序员写出别人容易读懂的代码。",
    "机器学习是一种让程序从例子中学习、而不是依靠手写规则的方法。模型在数据集上训练，调整参数来减小误差，"
    "然后在从未见过的新例子上进行评估。训练神经网络需要数据、损失函数、优化器和耐心。",
    "语言模型预测序列中的下一个词元。文本先由分词器切分成词元，每个词元对应一个向量，"
    "带有注意力层的模型把这些向量结合起来，为每一个可能的下一个词元计算概率。视觉编码器把图片变成语言模型能读懂的特征。",
    "数学是描述规律的语言。数字用来计数，几何描述形状和空间，代数处理未知的数量，统计帮助我们对不确定的事情进行推理。"
    "例如，二加三等于五，七乘八等于五十六，半径为r的圆的面积是圆周率乘以r的平方。",
    "会议在星期一上午九点半开始，地点是二零四会议室。请带上你的笔记本电脑、上个季度的报告和你的问题。"
    "我们会讨论预算、接下来三个月的计划，以及怎样改进团队之间的沟通。",
    "音乐能在几秒钟之内改变我们的心情。缓慢的旋律可能让人平静或者伤感，而快速的节奏让人想要跳舞。"
    "几千年来，人们用鼓、笛子、琴弦和自己的歌声创作音乐，用来庆祝、悼念和讲故事。",
    "健康来自每天坚持的简单小事：充足的睡眠、规律的运动、干净的饮用水，以及包含水果、蔬菜、谷物和蛋白质的均衡饮食。"
    "每天散步半小时，用白开水代替含糖饮料，多和朋友在一起，都会带来真正的改变。",
    "世界各地的城市都在不断发展。便利的公共交通、安全的自行车道、公园、图书馆和价格合理的住房，"
    "让城市成为宜居的地方。规划者必须在保护环境的同时，兼顾居民、企业和游客的需要。",
    "海洋覆盖了地球表面百分之七十以上的面积。它产生了我们呼吸的大部分氧气，吸收热量和二氧化碳，"
    "是数百万种生物的家园，从微小的浮游生物到巨大的鲸鱼。保护海洋免受污染和过度捕捞，关系到每一个人。",
    "学习一项新技能的时候，进步很少是一帆风顺的。一开始什么都觉得困难而缓慢。经过练习，"
    "小的步骤变成了习惯，你就可以专注于更难的问题。错误并不是失败，它们正好告诉你接下来该练习什么。",
    "谢谢你的来信。很抱歉回复晚了，我上个星期出差了。是的，我很乐意帮忙做这个项目。我们星期四下午可以谈一谈吗？"
    "告诉我哪个时间对你最方便，我会在通话之前把我的想法简单整理一下发给你。",
    "历史上有许多改变日常生活的发明：车轮、造纸术、印刷术、指南针、蒸汽机、电、电话、飞机和互联网。"
    "每一项发明都让人们更容易出行、贸易、分享知识和相互合作。",
    "在花园里，西红柿需要充足的阳光，生菜适合在凉爽的天气里生长，罗勒和薄荷这样的香草很容易种在小花盆里。"
    "早上给植物浇水，经常除草，再加一些堆肥，让土壤保持肥沃。",
    "问答：现在几点了？现在四点半。图书馆在哪里？在邮局旁边，公园对面。这个多少钱？十二块钱。"
    "你更喜欢哪一个，绿色的还是棕色的？我更喜欢棕色的，谢谢。",
)
